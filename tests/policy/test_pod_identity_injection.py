"""The opt-in injection policy (deploy/components/pod-identity-injection), applied with a CEL
interpreter: every expression of the shipped YAML is compiled with cel-python and pods are mutated the
way the API server mutates them (mutation.py), then checked against the Pod schema.

What this cannot prove: cel-python does not type-check as the API server does (the Object types of the
patch values are only checked against the paths they are added at, here), and the pods are fixtures.
"""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from celpy import celtypes

from admission import documents, only
from mutation import MutatingPolicy, run

ROOT = Path(__file__).resolve().parents[2]
POLICY_FILE = ROOT / "deploy" / "components" / "pod-identity-injection" / "pod-identity-injection.yaml"
WORKLOAD_PATCH = ROOT / "deploy" / "components" / "pod-identity-workload" / "pod-identity.yaml"
P = MutatingPolicy(POLICY_FILE)

LABEL = "imds-broker.io/container-credentials"
MOUNT_PATH = "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount"
TOKEN_FILE = f"{MOUNT_PATH}/eks-pod-identity-token"
URI = "http://169.254.170.23/v1/credentials"
VOLUME = {
    "name": "eks-pod-identity-token",
    "projected": {"sources": [{"serviceAccountToken": {
        "audience": "pods.eks.amazonaws.com", "expirationSeconds": 86400, "path": "eks-pod-identity-token"}}]},
}
ENV = [
    {"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": URI},
    {"name": "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "value": TOKEN_FILE},
]
MOUNT = {"name": "eks-pod-identity-token", "mountPath": MOUNT_PATH, "readOnly": True}
# The first Kubernetes with MutatingAdmissionPolicy v1beta1.
KUBERNETES = "1.34"


def pod(containers=None, init_containers=None, volumes=None, labels=None) -> dict:
    spec: dict = {"containers": containers if containers is not None else [{"name": "app", "image": "app:1"}]}
    if init_containers is not None:
        spec["initContainers"] = init_containers
    if volumes is not None:
        spec["volumes"] = volumes
    metadata = {"name": "billing-7d9f-x2x4q", "namespace": "apps"}
    if labels is not None:
        metadata["labels"] = labels
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


OPTED_IN = {LABEL: "true", "app": "billing"}


def create(obj: dict, operation: str = "CREATE") -> dict:
    return {
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": operation,
        "namespace": obj["metadata"]["namespace"],
        "name": obj["metadata"]["name"],
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "object": obj,
        "oldObject": None,
    }


def mutate(obj: dict):
    result = P.admit(create(copy.deepcopy(obj)))
    assert result.admitted, result.message
    return result


def patches(result) -> list:
    return [p for mutation in result.patches for p in mutation]


def assert_valid_pod(obj: dict):
    kubernetes_validate.validate(obj, KUBERNETES, strict=True)


# --- the objects ---------------------------------------------------------------------------------------


def test_the_policy_is_v1beta1_matches_only_pod_creation_and_its_binding_names_it():
    assert P.policy["apiVersion"] == P.binding["apiVersion"] == "admissionregistration.k8s.io/v1beta1"
    assert P.spec["matchConstraints"]["resourceRules"] == [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}]
    assert P.binding["spec"]["policyName"] == P.name
    assert P.spec["failurePolicy"] == "Fail"
    assert [m["patchType"] for m in P.spec["mutations"]] == ["JSONPatch"] * len(P.spec["mutations"])
    for doc in documents(POLICY_FILE):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_object_selector_and_the_match_condition_name_the_same_label():
    assert P.spec["matchConstraints"]["objectSelector"] == {"matchLabels": {LABEL: "true"}}
    (condition,) = P.spec["matchConditions"]
    assert f"'{LABEL}'" in condition["expression"]


# --- opted-in pods -------------------------------------------------------------------------------------


def test_a_labelled_pod_gets_exactly_the_volume_the_mount_and_the_two_variables():
    before = pod(labels=OPTED_IN)
    result = mutate(before)
    want = copy.deepcopy(before)
    want["spec"]["volumes"] = [VOLUME]
    want["spec"]["containers"][0]["env"] = ENV
    want["spec"]["containers"][0]["volumeMounts"] = [MOUNT]
    assert result.object == want
    assert_valid_pod(result.object)


def test_what_is_there_already_stays_first_and_unchanged():
    before = pod(
        containers=[{"name": "app", "image": "app:1", "env": [{"name": "LOG", "value": "debug"}],
                     "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
        volumes=[{"name": "data", "emptyDir": {}}],
        labels=OPTED_IN,
    )
    result = mutate(before)
    spec = result.object["spec"]
    assert spec["volumes"] == [{"name": "data", "emptyDir": {}}, VOLUME]
    assert spec["containers"][0]["env"] == [{"name": "LOG", "value": "debug"}, *ENV]
    assert spec["containers"][0]["volumeMounts"] == [{"name": "data", "mountPath": "/data"}, MOUNT]
    assert_valid_pod(result.object)


def several_containers_pod() -> dict:
    return pod(
        containers=[
            {"name": "web", "image": "web:1"},
            {"name": "worker", "image": "worker:1", "env": [{"name": "QUEUE", "value": "jobs"}]},
            {"name": "exporter", "image": "exporter:1", "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
        ],
        init_containers=[
            {"name": "migrate", "image": "migrate:1"},
            # A native sidecar.
            {"name": "proxy", "image": "proxy:1", "restartPolicy": "Always",
             "env": [{"name": "PORT", "value": "15001"}], "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
        ],
        volumes=[{"name": "data", "emptyDir": {}}],
        labels=OPTED_IN,
    )


def test_every_container_and_init_container_gets_the_mount_and_the_variables_once():
    before = several_containers_pod()
    result = mutate(before)
    spec = result.object["spec"]
    assert spec["volumes"] == [{"name": "data", "emptyDir": {}}, VOLUME]
    for field in ("containers", "initContainers"):
        assert [c["name"] for c in spec[field]] == [c["name"] for c in before["spec"][field]], "no container added"
        for old, new in zip(before["spec"][field], spec[field]):
            assert new["env"] == (old.get("env") or []) + ENV, new["name"]
            assert new["volumeMounts"] == (old.get("volumeMounts") or []) + [MOUNT], new["name"]
            assert {k: v for k, v in new.items() if k not in ("env", "volumeMounts")} == {
                k: v for k, v in old.items() if k not in ("env", "volumeMounts")}
    assert_valid_pod(result.object)


def test_every_patch_value_is_of_the_object_type_its_path_expects():
    for obj in (pod(labels=OPTED_IN), several_containers_pod()):
        ops = patches(mutate(obj))
        assert ops
        for op in ops:
            assert op.op == "add"
            fields = tuple(p for p in op.path.strip("/").split("/") if not (p.isdigit() or p == "-"))
            assert op.types, f"{op.path}: the value is built without Object types"
            for where, object_path in op.types:
                inside = tuple(w for w in where if isinstance(w, str))
                assert object_path == fields + inside, (op.path, where, object_path)


# --- idempotence -----------------------------------------------------------------------------------


def test_a_second_pass_changes_nothing():
    # reinvocationPolicy IfNeeded: the policy may see its own output again.
    for obj in (pod(labels=OPTED_IN), several_containers_pod()):
        once = mutate(obj)
        twice = mutate(once.object)
        assert patches(twice) == [] and twice.object == once.object


def test_a_pod_carrying_the_volume_mount_and_variables_already_is_left_as_it_is():
    # As pod-identity-workload (or EKS's own webhook) writes it.
    workload = yaml.safe_load(WORKLOAD_PATCH.read_text())["spec"]["template"]["spec"]
    (container,) = workload["containers"]
    before = pod(
        containers=[{"image": "app:1", **container}],
        volumes=workload["volumes"],
        labels=OPTED_IN,
    )
    result = mutate(before)
    assert patches(result) == [] and result.object == before


def test_the_workload_component_writes_what_the_policy_injects():
    workload = yaml.safe_load(WORKLOAD_PATCH.read_text())["spec"]["template"]["spec"]
    (container,) = workload["containers"]
    injected = mutate(pod(labels=OPTED_IN)).object["spec"]
    assert injected["volumes"] == workload["volumes"]
    assert injected["containers"][0]["env"] == container["env"]
    assert injected["containers"][0]["volumeMounts"] == container["volumeMounts"]


def test_a_container_naming_either_variable_keeps_its_env_and_still_gets_the_mount():
    own = [{"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": "http://127.0.0.1:9911/creds"}]
    before = pod(containers=[{"name": "custom", "image": "c:1", "env": own}, {"name": "plain", "image": "p:1"}],
                 labels=OPTED_IN)
    spec = mutate(before).object["spec"]
    assert spec["containers"][0]["env"] == own, "its token would go where its own URI points"
    assert spec["containers"][0]["volumeMounts"] == [MOUNT]
    assert spec["containers"][1]["env"] == ENV


def test_a_mount_at_the_path_and_a_volume_of_the_name_are_kept_not_doubled():
    theirs = {"name": "eks-pod-identity-token", "secret": {"secretName": "their-token"}}
    mount = {"name": "eks-pod-identity-token", "mountPath": MOUNT_PATH}
    before = pod(containers=[{"name": "app", "image": "a:1", "volumeMounts": [mount]}], volumes=[theirs],
                 labels=OPTED_IN)
    spec = mutate(before).object["spec"]
    assert spec["volumes"] == [theirs]
    assert spec["containers"][0]["volumeMounts"] == [mount]
    assert spec["containers"][0]["env"] == ENV


# --- everything else is untouched ----------------------------------------------------------------


@pytest.mark.parametrize("labels", [None, {}, {"app": "billing"}, {LABEL: "false"}, {LABEL: "True"}, {LABEL: ""}],
                         ids=["no-labels", "empty", "other-label", "false", "True", "empty-value"])
def test_a_pod_without_the_label_set_to_true_is_untouched(labels):
    before = several_containers_pod()
    if labels is None:
        del before["metadata"]["labels"]
    else:
        before["metadata"]["labels"] = labels
    result = P.admit(create(copy.deepcopy(before)))
    assert result.how == "not-matched" and result.object == before
    # The matchCondition alone (as when objectSelector matched, e.g. after an edit of one of the two).
    (name, condition), = P.match_conditions
    value = run(condition, P._activation(create(before), before))
    assert isinstance(value, celtypes.BoolType) and not value, name


def test_the_match_condition_holds_for_the_label():
    obj = pod(labels=OPTED_IN)
    (_, condition), = P.match_conditions
    assert run(condition, P._activation(create(obj), obj)) is not False
    assert bool(run(condition, P._activation(create(obj), obj)))


@pytest.mark.parametrize("operation", ["UPDATE", "DELETE", "CONNECT"])
def test_other_operations_are_not_matched(operation):
    before = pod(labels=OPTED_IN)
    assert P.admit(create(before, operation)).how == "not-matched"


def test_the_readme_documents_the_label():
    readme = (ROOT / "README.md").read_text()
    assert f'{LABEL}: "true"' in readme
    assert "deploy/components/pod-identity-injection" in readme
