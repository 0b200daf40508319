"""A ValidatingAdmissionPolicy (admissionregistration.k8s.io/v1) and its binding, loaded from a YAML
file and decided with cel-python the way the API server decides (k8s.io/apiserver
.../policy/validating, dispatcher.go and validator.go):

  1. matchConstraints.resourceRules must match the request's resource, subresource and operation;
  2. matchConditions: any false -> the policy does not apply (admitted by this policy); an error (and
     none false) -> failurePolicy decides;
  3. otherwise every validation is evaluated: false -> denied with its message (messageExpression
     first when it yields a one-line string), an error -> failurePolicy decides;
  4. the binding's validationActions say what a denial does (Deny rejects the request).

Every expression is compiled when the policy is loaded: a parse error fails the test run, it is never
a skip. Shared by the policy tests of this folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import celpy
import yaml
from celpy import celtypes

ENV = celpy.Environment()


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def only(docs: list[dict], kind: str, where: str = "the file") -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"{where} must hold exactly one {kind}, found {len(found)}"
    return found[0]


@dataclass
class Expression:
    where: str  # e.g. "validations[0].expression"
    source: str
    program: celpy.Runner


def compile_expression(where: str, source: str, functions: dict | None = None) -> Expression:
    """Compiles one expression, with extra `functions` (the Kubernetes CEL library's, where cel-python
    lacks them); a parse error is raised, never swallowed."""
    assert isinstance(source, str) and source.strip(), f"{where} is empty"
    ast = ENV.compile(source)
    return Expression(where, source, ENV.program(ast, functions=functions))


class EvalError(Exception):
    pass


def run(expr: Expression, activation: dict):
    try:
        result = expr.program.evaluate(activation)
    except celpy.CELEvalError as e:
        raise EvalError(f"{expr.where}: {e.args[0] if e.args else e}") from e
    if isinstance(result, celpy.CELEvalError):
        raise EvalError(f"{expr.where}: {result.args[0] if result.args else result}")
    return result


@dataclass
class Decision:
    admitted: bool
    # "not-matched", "admitted", "denied" (a validation was false) or "error" (evaluation failed)
    how: str
    message: str = ""
    validation: dict | None = None


def match_conditions(conditions, activation: dict) -> tuple[bool, list[str]]:
    """Evaluates a policy's compiled matchConditions as the API server does: any false means not matched
    (whatever errors the others raised); otherwise the errors, which the caller hands to failurePolicy."""
    errors = []
    for name, expr in conditions:
        try:
            value = run(expr, activation)
        except EvalError as e:
            errors.append(str(e))
            continue
        if not isinstance(value, celtypes.BoolType):
            errors.append(f"matchCondition {name} returned {type(value).__name__}, not a bool")
        elif not value:
            return False, []
    return True, errors


def rule_matches(rule: dict, request: dict) -> bool:
    """A RuleWithOperations of matchConstraints.resourceRules against the request (`*` is any group,
    version or operation; in resources `*` is every resource but no subresource, `*/*` everything,
    `pods/*` every subresource of pods, `*/scale` that subresource of every resource)."""
    res = request["resource"]
    sub = request.get("subResource", "")

    def has(values, value):
        return "*" in values or value in values

    def resource_ok(pattern: str) -> bool:
        base, _, subres = pattern.partition("/")
        if base not in ("*", res["resource"]):
            return False
        if not subres:
            return not sub
        return subres == "*" or subres == sub

    return (
        has(rule.get("apiGroups", []), res["group"])
        and has(rule.get("apiVersions", []), res["version"])
        and has(rule.get("operations", []), request["operation"])
        and any(resource_ok(r) for r in rule.get("resources", []))
    )


class Policy:
    """One policy file: the policy, its binding, their compiled expressions, and the decision."""

    def __init__(self, path: Path):
        self.path = path
        docs = documents(path)
        self.policy = only(docs, "ValidatingAdmissionPolicy", path.name)
        self.binding = only(docs, "ValidatingAdmissionPolicyBinding", path.name)
        self.name = self.policy["metadata"]["name"]
        self.spec = self.policy["spec"]
        spec = self.spec
        self.match_conditions = [
            (c["name"], compile_expression(f"matchConditions ({c['name']})", c["expression"]))
            for c in spec.get("matchConditions", [])
        ]
        self.variables = [
            (v["name"], compile_expression(f"variables ({v['name']})", v["expression"]))
            for v in spec.get("variables", [])
        ]
        self.validations = [
            (
                v,
                compile_expression(f"validations[{i}].expression", v["expression"]),
                compile_expression(f"validations[{i}].messageExpression", v["messageExpression"])
                if "messageExpression" in v
                else None,
            )
            for i, v in enumerate(spec.get("validations", []))
        ]

    def every_expression(self) -> list[tuple[str, str]]:
        out = []
        spec = self.spec
        for i, c in enumerate(spec.get("matchConditions", [])):
            out.append((f"matchConditions[{i}] ({c['name']})", c["expression"]))
        for i, v in enumerate(spec.get("variables", [])):
            out.append((f"variables[{i}] ({v['name']})", v["expression"]))
        for i, v in enumerate(spec.get("validations", [])):
            out.append((f"validations[{i}].expression", v["expression"]))
            if "messageExpression" in v:
                out.append((f"validations[{i}].messageExpression", v["messageExpression"]))
        for i, a in enumerate(spec.get("auditAnnotations", [])):
            out.append((f"auditAnnotations[{i}].valueExpression", a["valueExpression"]))
        return out

    def deny(self, how: str, message: str, validation: dict | None = None) -> Decision:
        text = (
            f"ValidatingAdmissionPolicy '{self.name}' with binding '{self.binding['metadata']['name']}' "
            f"denied request: {message}"
        )
        if "Deny" not in self.binding["spec"]["validationActions"]:
            return Decision(True, how + "-not-enforced", text, validation)
        return Decision(False, how, text, validation)

    def on_error(self, message: str) -> Decision:
        if self.spec.get("failurePolicy", "Fail") == "Ignore":
            return Decision(True, "error-ignored", message)
        return self.deny("error", message)

    def decide(self, request: dict) -> Decision:
        rules = self.spec["matchConstraints"]["resourceRules"]
        if not any(rule_matches(r, request) for r in rules):
            return Decision(True, "not-matched")
        activation = {
            "object": celpy.json_to_cel(request.get("object")),
            "oldObject": celpy.json_to_cel(request.get("oldObject")),
            "request": celpy.json_to_cel(request),
        }

        matched, errors = match_conditions(self.match_conditions, activation)
        if not matched:
            return Decision(True, "not-matched")
        if errors:
            return self.on_error("; ".join(errors))

        # variables, each able to use the ones before it (the API server evaluates them lazily; these are
        # constants, so evaluating them up front decides the same).
        variables = celtypes.MapType({})
        for name, expr in self.variables:
            try:
                variables[celtypes.StringType(name)] = run(expr, {**activation, "variables": variables})
            except EvalError as e:
                return self.on_error(str(e))
        with_vars = {**activation, "variables": variables}

        for validation, expr, message_expr in self.validations:
            try:
                value = run(expr, with_vars)
            except EvalError as e:
                return self.on_error(str(e))
            if not isinstance(value, celtypes.BoolType):
                return self.on_error(f"{expr.where} returned {type(value).__name__}, not a bool")
            if value:
                continue
            message = ""
            if message_expr is not None:
                try:
                    m = run(message_expr, with_vars)
                    if isinstance(m, celtypes.StringType) and "\n" not in m:
                        message = str(m).strip()
                except EvalError:
                    pass  # the API server falls back to `message`
            if not message:
                message = validation.get("message", "").strip()
            if not message:
                message = f"failed expression: {validation['expression'].strip()}"
            return self.deny("denied", message, validation)
        return Decision(True, "admitted")
