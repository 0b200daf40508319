"""The startup-taint admission policy (deploy/components/startup-taint/), evaluated with cel-python.

The agent may update Nodes (RBAC cannot narrow that); the policy admits its updates only for its own
Node (the node name the API server puts in the agent's user info) and only when the single change is
that the startup taint is gone. See admission.py for how a request is decided.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from admission import Policy, documents, only

ROOT = Path(__file__).resolve().parents[2]
P = Policy(ROOT / "deploy" / "components" / "startup-taint" / "startup-taint.yaml")
TAINT = "imds-broker.io/agent-not-ready"
NODE_NAME_KEY = "authentication.kubernetes.io/node-name"


def agent_username() -> str:
    rbac = ROOT / "deploy" / "base" / "rbac.yaml"
    sa = only(documents(rbac), "ServiceAccount", rbac.name)
    return f"system:serviceaccount:{sa['metadata']['namespace']}:{sa['metadata']['name']}"


AGENT = agent_username()


def node(name="node-1", taints=(("node.kubernetes.io/not-ready", "NoSchedule"), (TAINT, "NoSchedule")), **extra):
    obj = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}, "resourceVersion": "42"},
        "spec": {"podCIDR": "10.244.1.0/24", "taints": [{"key": k, "effect": e} for k, e in taints]},
    }
    for path, value in extra.items():
        section, field = path.split("__")
        obj[section][field] = value
    return obj


def update(old: dict, new: dict, *, username=AGENT, node_name="node-1") -> dict:
    user = {"username": username, "groups": ["system:serviceaccounts", "system:authenticated"]}
    if node_name is not None:
        user["extra"] = {NODE_NAME_KEY: [node_name]}
    return {
        "uid": "2b1f3a1e-0000-4000-8000-000000000002",
        "kind": {"group": "", "version": "v1", "kind": "Node"},
        "resource": {"group": "", "version": "v1", "resource": "nodes"},
        "subResource": "",
        "name": new["metadata"]["name"],
        "namespace": "",
        "operation": "UPDATE",
        "userInfo": user,
        "object": new,
        "oldObject": old,
        "dryRun": False,
    }


OLD = node()
REMOVED = node(taints=(("node.kubernetes.io/not-ready", "NoSchedule"),))


def test_every_expression_compiles():
    assert len(P.every_expression()) >= 6


def test_the_policy_fails_closed_and_matches_node_updates_only():
    assert P.spec["failurePolicy"] == "Fail"
    assert P.binding["spec"]["validationActions"] == ["Deny"]
    assert P.spec["matchConstraints"]["resourceRules"] == [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"], "resources": ["nodes"]}
    ]


def test_the_match_condition_names_the_agents_service_account():
    assert P.spec["matchConditions"][0]["expression"] == f"request.userInfo.username == '{AGENT}'"


def test_the_rbac_in_the_file_grants_get_and_update_of_nodes_to_the_agent_only():
    docs = documents(P.path)
    role = only(docs, "ClusterRole", P.path.name)
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "update"]}]
    binding = only(docs, "ClusterRoleBinding", P.path.name)
    assert [f"system:serviceaccount:{s['namespace']}:{s['name']}" for s in binding["subjects"]] == [AGENT]


def test_the_agent_removing_the_startup_taint_from_its_own_node_is_admitted():
    decision = P.decide(update(OLD, REMOVED))
    assert decision.admitted and decision.how == "admitted", decision


def test_every_copy_of_the_taint_may_go_and_the_order_of_the_rest_stays():
    old = node(taints=((TAINT, "NoSchedule"), ("a", "NoSchedule"), (TAINT, "NoExecute"), ("b", "NoSchedule")))
    new = node(taints=(("a", "NoSchedule"), ("b", "NoSchedule")))
    assert P.decide(update(old, new)).admitted


FORBIDDEN = {
    "another-node": (OLD | {"metadata": {**OLD["metadata"], "name": "node-2"}}, None, "own Node"),
    "no-node-name-in-the-token": (OLD, dict(node_name=None), "own Node"),
    "node-name-of-another-node": (OLD, dict(node_name="node-2"), "own Node"),
    "another-taint-removed": (OLD, "remove-other", "no other taint"),
    "a-taint-added": (OLD, "add", "no other taint"),
    "nothing-to-remove": (node(taints=(("x", "NoSchedule"),)), "same", "no other taint"),
    "a-label-changed": (OLD, "label", "labels"),
    "an-annotation-added": (OLD, "annotation", "labels"),
    "cordoned": (OLD, "unschedulable", "labels"),
}


def forbidden_request(name: str) -> dict:
    old, how, _ = FORBIDDEN[name]
    old = copy.deepcopy(old)
    new = copy.deepcopy(REMOVED)
    new["metadata"]["name"] = old["metadata"]["name"]
    kwargs = {}
    if how == "remove-other":
        new["spec"]["taints"] = [{"key": TAINT, "effect": "NoSchedule"}]
    elif how == "add":
        new["spec"]["taints"].append({"key": "evil", "effect": "NoExecute"})
    elif how == "same":
        new["spec"]["taints"] = copy.deepcopy(old["spec"]["taints"])
    elif how == "label":
        new["metadata"]["labels"] = {"kubernetes.io/hostname": "node-1", "node-role.kubernetes.io/control-plane": ""}
    elif how == "annotation":
        new["metadata"]["annotations"] = {"x": "y"}
    elif how == "unschedulable":
        new["spec"]["unschedulable"] = True
    elif isinstance(how, dict):
        kwargs = how
    return update(old, new, **kwargs)


@pytest.mark.parametrize("name", sorted(FORBIDDEN))
def test_anything_else_the_agent_does_to_a_node_is_denied_naming_the_policy(name):
    decision = P.decide(forbidden_request(name))
    assert not decision.admitted and decision.how == "denied", decision
    assert "imds-broker-startup-taint" in decision.message
    assert FORBIDDEN[name][2] in decision.message, decision.message


@pytest.mark.parametrize("user", ["system:node:node-1", "system:serviceaccount:kube-system:node-controller", "alice"])
def test_other_requesters_are_not_affected(user):
    for name in FORBIDDEN:
        request = forbidden_request(name)
        request["userInfo"]["username"] = user
        assert P.decide(request).how == "not-matched"


def test_the_taint_key_is_the_one_the_readme_recommends():
    readme = (ROOT / "README.md").read_text()
    assert re.search(re.escape(f"--startup-taint {TAINT}"), readme)
    assert P.spec["variables"][0]["expression"] == f"'{TAINT}'"
