"""Checks over rendered manifests (lists of documents, as `kubectl kustomize` prints them). Each check
returns the problems it found as lines of text, an empty list when there are none, so that
test_checks.py can show every one of them failing on a broken input, and test_manifests.py applies
them to what deploy/ renders.

  schema_problems:    every document against the Kubernetes OpenAPI schema of its kind (the schemas
                      kubernetes-validate bundles, strict: unknown fields are problems too); kinds of
                      CRDs against the schemas in CRD_SCHEMAS below; a kind with neither is a problem.
  cli_problems:       every flag and environment variable given to an imds-broker container exists in
                      the `--help` of the (sub)command that container runs.
  image_problems:     every imds-broker image is imds-broker:<the version in Cargo.toml>.
  uninstall_problems: the uninstall DaemonSet runs `iptables uninstall` with the capture container's
                      image, privileges, lock and host network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import functools

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils

# kubernetes-validate reads and parses its schema files (the definitions alone are 1.8 MB) on every
# call; they never change during a run, and the validator only reads them.
kubernetes_validate.utils.schema_contents = functools.cache(kubernetes_validate.utils.schema_contents)

IMAGE_NAME = "imds-broker"

# The capture rules run in the node's network namespace; the uninstall must too.
CAPTURE = "capture"
UNINSTALL = "uninstall"

# monitoring.coreos.com/v1 PodMonitor, only as far as deploy/ uses it (kubernetes-validate knows no
# CRDs): the fields below, no others, and a selector and endpoints shaped as the operator reads them.
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {"type": "object"}},
    },
}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PodMonitor"},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "namespace": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                },
                "additionalProperties": False,
            },
            "spec": {
                "type": "object",
                "required": ["selector", "podMetricsEndpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": _LABEL_SELECTOR,
                    "namespaceSelector": {"type": "object"},
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string", "minLength": 1},
                                "path": {"type": "string", "pattern": "^/"},
                                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "relabelings": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "properties": {
                                            "sourceLabels": {"type": "array", "items": {"type": "string"}},
                                            "targetLabel": {"type": "string", "minLength": 1},
                                            "action": {"enum": ["replace", "keep", "drop", "labelmap"]},
                                            "regex": {"type": "string"},
                                            "replacement": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


# monitoring.coreos.com/v1 PrometheusRule, likewise: groups of alerting or recording rules.
_DURATION = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
CRD_SCHEMAS[("monitoring.coreos.com/v1", "PrometheusRule")] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": CRD_SCHEMAS[("monitoring.coreos.com/v1", "PodMonitor")]["properties"]["metadata"],
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {"type": "string", "minLength": 1},
                                        "record": {"type": "string", "minLength": 1},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": _DURATION,
                                        "keep_firing_for": _DURATION,
                                        "labels": _STRING_MAP,
                                        "annotations": _STRING_MAP,
                                    },
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def name_of(doc: dict) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def schema_problems(docs: list[dict], kubernetes_version: str) -> list[str]:
    problems = []
    for doc in docs:
        crd = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
        try:
            if crd is not None:
                jsonschema.validate(doc, crd)
            else:
                kubernetes_validate.validate(doc, kubernetes_version, strict=True)
        except jsonschema.ValidationError as e:
            path = ".".join(str(p) for p in e.absolute_path)
            problems.append(f"{name_of(doc)}: Kubernetes {kubernetes_version}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{name_of(doc)}: no schema: {e.message}")
    return problems


# --- the binary's command line -----------------------------------------------------------------------


@dataclass
class Help:
    """What one (sub)command's `--help` accepts."""

    flags: set[str]
    env: set[str]

    @classmethod
    def parse(cls, text: str) -> Help:
        flags = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", text))
        env = set(re.findall(r"\[env: ([A-Z0-9_]+)=", text))
        assert flags, "a --help without any flag"
        return cls(flags, env)


def image_name(image: str) -> str:
    """The repository part of an image reference: no tag, no digest (a registry's port stays)."""
    head, _, last = image.split("@", 1)[0].rpartition("/")
    last = last.split(":", 1)[0]
    return f"{head}/{last}" if head else last


def is_ours(image: str) -> bool:
    name = image_name(image)
    return name == IMAGE_NAME or name.endswith("/" + IMAGE_NAME)


def command_line(words: tuple[str, ...]) -> str:
    return " ".join(("imds-broker", *words))


def pod_spec(doc: dict) -> dict | None:
    if doc.get("kind") in ("DaemonSet", "Deployment", "StatefulSet", "Job"):
        return doc["spec"]["template"]["spec"]
    if doc.get("kind") == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if doc.get("kind") == "Pod":
        return doc["spec"]
    return None


def containers(doc: dict):
    """(where, container) for every container and init container of a workload document."""
    spec = pod_spec(doc)
    if spec is None:
        return
    for field in ("initContainers", "containers"):
        for c in spec.get(field) or []:
            yield f"{name_of(doc)} {field}/{c.get('name')}", c


def subcommand(argv: list[str]) -> tuple[str, ...]:
    """The subcommand words an argument list starts with: (), ("iptables", "reconcile"), ..."""
    words = []
    for arg in argv:
        if arg.startswith("-"):
            break
        words.append(arg)
    return tuple(words)


def cli_problems(docs: list[dict], helps: dict[tuple[str, ...], Help]) -> list[str]:
    """helps maps a subcommand (() for the agent itself) to its parsed --help."""
    problems = []
    checked = 0
    for doc in docs:
        for where, c in containers(doc):
            if not is_ours(c.get("image", "")):
                continue
            checked += 1
            if c.get("command"):
                problems.append(f"{where}: sets command {c['command']!r}; the image's entrypoint is the binary")
            argv = [str(a) for a in c.get("args") or []]
            words = subcommand(argv)
            help_ = helps.get(words)
            if help_ is None:
                problems.append(f"{where}: the binary has no subcommand `{command_line(words)}`")
                continue
            for arg in argv[len(words):]:
                if not arg.startswith("--"):
                    problems.append(f"{where}: argument {arg!r} is not a --flag (values go after '=')")
                    continue
                flag = arg.split("=", 1)[0]
                if flag not in help_.flags:
                    problems.append(f"{where}: {flag} is not a flag of `{command_line(words)}`")
            env = c.get("env") or []
            for i, var in enumerate(env):
                if "value" in var:
                    defined = {v["name"] for v in env[:i]}
                    for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(var["value"])):
                        if ref not in defined:
                            problems.append(f"{where}: {var['name']} refers to $({ref}), not defined before it (it would stay literal)")
                # A variable only there to be referenced by a later one is not the binary's.
                referenced = any(f"$({var['name']})" in str(v.get("value", "")) for v in env[i + 1:])
                if var["name"] not in help_.env and not referenced:
                    problems.append(f"{where}: environment variable {var['name']} is not read by `{command_line(words)}`")
    if checked == 0:
        problems.append("no imds-broker container in the manifests")
    return problems


# --- images ------------------------------------------------------------------------------------------


def image_problems(docs: list[dict], version: str, others: frozenset[str] = frozenset()) -> list[str]:
    """Our images must be exactly imds-broker:<version>; any other image must be one of `others`."""
    want = f"{IMAGE_NAME}:{version}"
    problems = []
    ours = 0
    for doc in docs:
        for where, c in containers(doc):
            image = c.get("image", "")
            if is_ours(image):
                ours += 1
                if image != want:
                    problems.append(f"{where}: image {image!r}, not {want!r} (Cargo.toml's version)")
            elif image not in others:
                problems.append(f"{where}: unexpected image {image!r}")
    if ours == 0:
        problems.append("no imds-broker image in the manifests")
    return problems


# --- the uninstall path ------------------------------------------------------------------------------


def only_daemonset(docs: list[dict]) -> dict:
    found = [d for d in docs if d.get("kind") == "DaemonSet"]
    assert len(found) == 1, f"want one DaemonSet, found {[name_of(d) for d in found]}"
    return found[0]


def container(spec: dict, field: str, name: str) -> dict | None:
    return next((c for c in spec.get(field) or [] if c.get("name") == name), None)


def mounted_host_paths(spec: dict, c: dict) -> dict[str, str]:
    """mountPath -> hostPath path of the container's hostPath mounts."""
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    out = {}
    for m in c.get("volumeMounts") or []:
        v = volumes.get(m["name"], {})
        if "hostPath" in v:
            out[m["mountPath"]] = v["hostPath"]["path"]
    return out


def uninstall_problems(uninstall_docs: list[dict], agent_docs: list[dict]) -> list[str]:
    agent = pod_spec(only_daemonset(agent_docs))
    cleanup = pod_spec(only_daemonset(uninstall_docs))
    capture = container(agent, "containers", CAPTURE)
    step = container(cleanup, "initContainers", UNINSTALL)
    if capture is None:
        return [f"the agent's DaemonSet has no {CAPTURE} container"]
    if step is None:
        return [f"the uninstall DaemonSet has no init container {UNINSTALL}"]
    problems = []
    if step.get("command") or [str(a) for a in step.get("args") or []] != ["iptables", "uninstall"]:
        problems.append(f"the uninstall runs {step.get('command')} {step.get('args')}, not `iptables uninstall`")
    if step.get("image") != capture.get("image"):
        problems.append(f"image {step.get('image')!r} differs from the capture container's {capture.get('image')!r}")
    if step.get("securityContext") != capture.get("securityContext"):
        problems.append(
            f"securityContext {step.get('securityContext')} differs from the capture container's "
            f"{capture.get('securityContext')}"
        )
    if cleanup.get("securityContext") != agent.get("securityContext"):
        problems.append("the pod securityContext differs from the agent's")
    if not cleanup.get("hostNetwork"):
        problems.append("not in the node's network namespace (hostNetwork), where the rules are")
    want_lock = {k: v for k, v in mounted_host_paths(agent, capture).items() if "xtables" in v}
    if not want_lock or mounted_host_paths(cleanup, step) != want_lock:
        problems.append(
            f"host mounts {mounted_host_paths(cleanup, step)} differ from the capture's xtables lock {want_lock}"
        )
    if cleanup.get("tolerations") != agent.get("tolerations"):
        problems.append("tolerates other taints than the agent: it would miss nodes the agent ran on")
    return problems
