"""A MutatingAdmissionPolicy (admissionregistration.k8s.io/v1beta1) with JSONPatch mutations and its
binding, loaded from a YAML file and applied with cel-python the way the API server applies it
(k8s.io/apiserver .../policy/mutating: dispatcher.go, patch/json_patch.go):

  1. matchConstraints.resourceRules must match the request, and matchConstraints.objectSelector the
     object's labels;
  2. matchConditions: any false -> the policy does not apply; an error (none false) -> failurePolicy;
  3. each mutation in order: its expression is evaluated against the object as the mutations before it
     left it (variables too, so they see that object), must return a list of JSONPatch, and the patch
     is applied (RFC 6902); an error -> failurePolicy.

What cel-python lacks is supplied here and only here, as the Kubernetes CEL environment defines it:
  - `JSONPatch{op, path, from, value}` and `Object.<field>...{...}` (the typed objects a patch's
    value is built from): constructors that yield plain maps, remembering the Object's field path so
    that a test can check each value is of the type the patch's path expects;
  - `<list>.indexOf(x)` (Kubernetes' list library: the first index of x, -1 when absent).
Only JSONPatch mutations are understood: an ApplyConfiguration mutation fails loading, never a skip.
Type checking (the API server's compile step) is not done; the mutated object is checked against the
Pod schema by the tests instead.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import celpy
from celpy import celtypes

import admission
from admission import EvalError, Expression, documents, match_conditions, only, rule_matches, run

JSONPATCH_FIELDS = {"op", "path", "from", "value"}


class Typed(celtypes.MapType):
    """An `Object.a.b{...}` value: a map that knows its field path (("a", "b"))."""

    def __init__(self, fields, path: tuple[str, ...]):
        super().__init__(fields or {})
        self.object_path = path


class ObjectType(celtypes.MapType):
    """`Object` and its nested field types: selecting a field gives the nested type, `{...}` a value."""

    def __init__(self, path: tuple[str, ...] = ()):
        super().__init__({})
        self.object_path = path

    def __getitem__(self, key):
        return ObjectType((*self.object_path, str(key)))

    def get(self, key, default=None):
        return self[key]

    def __contains__(self, key):
        return True

    def __call__(self, fields):
        return Typed(fields, self.object_path)


class JSONPatchOp(celtypes.MapType):
    pass


def jsonpatch_type(fields):
    unknown = {str(k) for k in (fields or {})} - JSONPATCH_FIELDS
    if unknown:
        raise TypeError(f"JSONPatch has no field(s) {sorted(unknown)}")
    return JSONPatchOp(fields or {})


def index_of(items, value):
    for i, item in enumerate(items):
        if item == value:
            return celtypes.IntType(i)
    return celtypes.IntType(-1)


FUNCTIONS = {"indexOf": index_of}


def compile_expression(where: str, source: str) -> Expression:
    return admission.compile_expression(where, source, FUNCTIONS)


def to_json(value):
    """A cel-python value as plain JSON data; errors hidden inside a value are raised."""
    if isinstance(value, celpy.CELEvalError):
        raise EvalError(str(value.args[0] if value.args else value))
    # cel-python's types subclass Python's (BoolType is checked before int); `+` may yield plain ones.
    if isinstance(value, celtypes.BoolType | bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, celtypes.MapType):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if value is None:
        return None
    raise TypeError(f"no JSON for {type(value).__name__}")


def typed_paths(value, at: tuple = ()) -> list[tuple[tuple, tuple[str, ...]]]:
    """(where in the value, Object field path) of every typed object in a patch value."""
    out = []
    if isinstance(value, Typed):
        out.append((at, value.object_path))
    if isinstance(value, celtypes.MapType):
        for k, v in value.items():
            out.extend(typed_paths(v, (*at, str(k))))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(typed_paths(v, (*at, i)))
    return out


@dataclass
class Patch:
    op: str
    path: str
    value: object
    # (where in the value, Object field path) of every typed object in the value
    types: list = field(default_factory=list)


# --- RFC 6902 (the operations a policy of this repository uses: add, and test for completeness) -------


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), f"not a JSON pointer: {path!r}"
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def apply_patch(doc: dict, patch: Patch) -> dict:
    """One operation on a copy of doc; a path that does not resolve raises, as the API server fails."""
    doc = copy.deepcopy(doc)
    *parents, last = _pointer(patch.path)
    target = doc
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if patch.op == "add":
        if isinstance(target, list):
            if last == "-":
                target.append(copy.deepcopy(patch.value))
            else:
                index = int(last)
                if not 0 <= index <= len(target):
                    raise IndexError(f"{patch.path}: index out of range")
                target.insert(index, copy.deepcopy(patch.value))
        else:
            target[last] = copy.deepcopy(patch.value)
    elif patch.op == "test":
        current = target[int(last)] if isinstance(target, list) else target[last]
        if current != patch.value:
            raise ValueError(f"test {patch.path} failed")
    else:
        raise NotImplementedError(f"JSON patch op {patch.op!r} is not used by this repository's policies")
    return doc


# --- the policy ----------------------------------------------------------------------------------------


def label_selector_matches(selector: dict | None, labels: dict) -> bool:
    if not selector:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


@dataclass
class Result:
    # "not-matched", "mutated" (the policy applied; it may have changed nothing) or "error"
    how: str
    object: dict
    patches: list[list[Patch]] = field(default_factory=list)  # per mutation
    message: str = ""

    @property
    def admitted(self) -> bool:
        return self.how != "error"


class MutatingPolicy:
    def __init__(self, path: Path):
        self.path = path
        docs = documents(path)
        self.policy = only(docs, "MutatingAdmissionPolicy", path.name)
        self.binding = only(docs, "MutatingAdmissionPolicyBinding", path.name)
        self.name = self.policy["metadata"]["name"]
        self.spec = spec = self.policy["spec"]
        self.match_conditions = [
            (c["name"], compile_expression(f"matchConditions ({c['name']})", c["expression"]))
            for c in spec.get("matchConditions", [])
        ]
        self.variables = [
            (v["name"], compile_expression(f"variables ({v['name']})", v["expression"]))
            for v in spec.get("variables", [])
        ]
        self.mutations = []
        for i, m in enumerate(spec["mutations"]):
            assert m["patchType"] == "JSONPatch", f"mutations[{i}]: only JSONPatch is evaluated here"
            self.mutations.append(compile_expression(f"mutations[{i}].jsonPatch", m["jsonPatch"]["expression"]))

    def every_expression(self) -> list[tuple[str, str]]:
        out = [(f"matchConditions ({c['name']})", c["expression"]) for c in self.spec.get("matchConditions", [])]
        out += [(f"variables ({v['name']})", v["expression"]) for v in self.spec.get("variables", [])]
        out += [(f"mutations[{i}]", m["jsonPatch"]["expression"]) for i, m in enumerate(self.spec["mutations"])]
        return out

    def _activation(self, request: dict, obj: dict) -> dict:
        return {
            "object": celpy.json_to_cel(obj),
            "oldObject": celpy.json_to_cel(request.get("oldObject")),
            "request": celpy.json_to_cel(request),
            "Object": ObjectType(),
            "JSONPatch": jsonpatch_type,
        }

    def _error(self, request: dict, message: str) -> Result:
        if self.spec.get("failurePolicy", "Fail") == "Ignore":
            return Result("not-matched", request["object"], message=message)
        return Result("error", request["object"], message=f"policy '{self.name}': {message}")

    def admit(self, request: dict) -> Result:
        obj = request["object"]
        constraints = self.spec["matchConstraints"]
        if not any(rule_matches(r, request) for r in constraints["resourceRules"]):
            return Result("not-matched", obj)
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if not label_selector_matches(constraints.get("objectSelector"), labels):
            return Result("not-matched", obj)
        matched, errors = match_conditions(self.match_conditions, self._activation(request, obj))
        if not matched:
            return Result("not-matched", obj)
        if errors:
            return self._error(request, "; ".join(errors))

        applied = []
        for expr in self.mutations:
            activation = self._activation(request, obj)
            variables = celtypes.MapType({})
            try:
                for name, vexpr in self.variables:
                    variables[celtypes.StringType(name)] = run(vexpr, {**activation, "variables": variables})
                value = run(expr, {**activation, "variables": variables})
                if not isinstance(value, list):  # ListType, or a plain list from `+`
                    raise EvalError(f"{expr.where} returned {type(value).__name__}, not a list of JSONPatch")
                patches = []
                for op in value:
                    if not isinstance(op, JSONPatchOp):
                        raise EvalError(f"{expr.where}: an element is a {type(op).__name__}, not a JSONPatch")
                    fields = {str(k): v for k, v in op.items()}
                    patches.append(Patch(str(fields["op"]), str(fields["path"]), to_json(fields.get("value")),
                                         typed_paths(fields.get("value"))))
                for patch in patches:
                    obj = apply_patch(obj, patch)
            except (EvalError, TypeError, KeyError, IndexError, ValueError) as e:
                return self._error(request, f"{expr.where}: {e}")
            applied.append(patches)
        return Result("mutated", obj, applied)
