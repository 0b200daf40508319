"""The TokenRequest admission policy (deploy/base/token-policy.yaml), evaluated with a CEL interpreter.

Every CEL expression of the policy is compiled with cel-python, and requests are decided the way the
API server decides them (admission.py).

What this cannot prove: cel-python does not type-check against the TokenRequest schema as the API
server does, and the fixtures are TokenRequests as this file builds them, not as an API server
serialises them. The fixture of the agent's own request mirrors Minter::mint (the agent's TokenRequest
code), and test_the_agents_token_request_is_the_allowed_fixture is only a tripwire over that source.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import celpy
from celpy import celtypes

from admission import EvalError, Policy, compile_expression, documents, only, run

ROOT = Path(__file__).resolve().parents[2]
POLICY_FILE = ROOT / "deploy" / "base" / "token-policy.yaml"
RBAC_FILE = ROOT / "deploy" / "base" / "rbac.yaml"

P = Policy(POLICY_FILE)
POLICY = P.policy
BINDING = P.binding
POLICY_NAME = P.name
SPEC = P.spec
MATCH_CONDITIONS = P.match_conditions
VARIABLES = P.variables
VALIDATIONS = P.validations
decide = P.decide
every_expression = P.every_expression


def agent_username() -> str:
    sa = only(documents(RBAC_FILE), "ServiceAccount", RBAC_FILE.name)
    return f"system:serviceaccount:{sa['metadata']['namespace']}:{sa['metadata']['name']}"


AGENT = agent_username()


# --- fixtures ----------------------------------------------------------------------------------------


def token_request(
    *,
    audiences=("sts.amazonaws.com",),
    expiration=600,
    bound=("v1", "Pod"),
    namespace="apps",
    service_account="billing",
) -> dict:
    """A TokenRequest as the agent makes it (Minter::mint), with parts replaced or left out (None)."""
    spec: dict = {}
    if audiences is not None:
        spec["audiences"] = list(audiences)
    if expiration is not None:
        spec["expirationSeconds"] = expiration
    if bound is not None:
        api_version, kind = bound
        spec["boundObjectRef"] = {
            "apiVersion": api_version,
            "kind": kind,
            "name": "billing-7d9f-x2x4q",
            "uid": "0b1e3c52-6a51-4a47-9d9c-3f0c1f3a9e11",
        }
    return {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "metadata": {"name": service_account, "namespace": namespace},
        "spec": spec,
        "status": {"token": ""},
    }


def admission_request(obj: dict, *, username: str = AGENT, groups=None, extra=None) -> dict:
    ns = obj["metadata"]["namespace"]
    sa = obj["metadata"]["name"]
    if groups is None:
        groups = ["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"]
    user = {"username": username, "uid": "5f8d0a4e-0000-4000-8000-000000000001", "groups": groups}
    if extra is not None:
        user["extra"] = extra
    return {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest"},
        "resource": {"group": "", "version": "v1", "resource": "serviceaccounts"},
        "subResource": "token",
        "requestKind": {"group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest"},
        "requestResource": {"group": "", "version": "v1", "resource": "serviceaccounts"},
        "requestSubResource": "token",
        "name": sa,
        "namespace": ns,
        "operation": "CREATE",
        "userInfo": user,
        "object": obj,
        "oldObject": None,
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }


ALLOWED = token_request()

# name -> (TokenRequest, the field whose validation must deny it)
FORBIDDEN = {
    "api-server-audience": (token_request(audiences=["https://kubernetes.default.svc"]), "audiences"),
    "api-server-audiences-as-defaulted": (
        token_request(audiences=["https://kubernetes.default.svc.cluster.local", "k3s"]),
        "audiences",
    ),
    "two-audiences-including-sts": (
        token_request(audiences=["sts.amazonaws.com", "https://kubernetes.default.svc"]),
        "audiences",
    ),
    "sts-audience-twice": (token_request(audiences=["sts.amazonaws.com", "sts.amazonaws.com"]), "audiences"),
    "no-audiences": (token_request(audiences=None), "audiences"),
    "empty-audiences": (token_request(audiences=[]), "audiences"),
    "another-audience": (token_request(audiences=["vault"]), "audiences"),
    "sts-audience-with-different-case": (token_request(audiences=["STS.amazonaws.com"]), "audiences"),
    "no-binding": (token_request(bound=None), "boundObjectRef"),
    "secret-binding": (token_request(bound=("v1", "Secret")), "boundObjectRef"),
    "node-binding": (token_request(bound=("v1", "Node")), "boundObjectRef"),
    "pod-kind-of-another-group": (token_request(bound=("example.com/v1", "Pod")), "boundObjectRef"),
    "a-day": (token_request(expiration=86400), "expirationSeconds"),
    "one-second-too-long": (token_request(expiration=601), "expirationSeconds"),
    "defaulted-hour": (token_request(expiration=3600), "expirationSeconds"),
    "kubelet-style-3607": (token_request(expiration=3607), "expirationSeconds"),
    "no-expiration": (token_request(expiration=None), "expirationSeconds"),
}


def without(obj: dict, *path: str) -> dict:
    obj = copy.deepcopy(obj)
    node = obj
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return obj


def with_value(obj: dict, value, *path: str) -> dict:
    obj = copy.deepcopy(obj)
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return obj


FORBIDDEN.update(
    {
        "pod-binding-without-uid": (without(ALLOWED, "spec", "boundObjectRef", "uid"), "boundObjectRef"),
        "pod-binding-with-empty-name": (with_value(ALLOWED, "", "spec", "boundObjectRef", "name"), "boundObjectRef"),
        "pod-binding-without-api-version": (
            without(ALLOWED, "spec", "boundObjectRef", "apiVersion"),
            "boundObjectRef",
        ),
    }
)

OTHER_REQUESTERS = {
    "another-service-account-in-the-agents-namespace": "system:serviceaccount:imds-broker:default",
    "the-agents-name-in-another-namespace": "system:serviceaccount:kube-system:imds-broker",
    "a-prefix-of-the-agent": AGENT + "-canary",
    "a-kubelet": "system:node:ip-10-0-0-7.ec2.internal",
    "a-user": "alice@example.com",
    "the-api-server-itself": "system:apiserver",
}


# --- the policy's shape ------------------------------------------------------------------------------


def test_the_policy_and_binding_are_admissionregistration_v1_and_fail_closed():
    assert POLICY["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert BINDING["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert SPEC["failurePolicy"] == "Fail"
    assert BINDING["spec"]["policyName"] == POLICY_NAME
    assert BINDING["spec"]["validationActions"] == ["Deny"]
    assert "matchResources" not in BINDING["spec"], "the binding must not narrow the policy's match"


def test_the_policy_matches_create_of_the_serviceaccounts_token_subresource_only():
    assert SPEC["matchConstraints"]["resourceRules"] == [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["serviceaccounts/token"]}
    ]
    assert decide(admission_request(ALLOWED)).how == "admitted"
    pod_create = admission_request(ALLOWED)
    pod_create.update(resource={"group": "", "version": "v1", "resource": "pods"}, subResource="")
    assert decide(pod_create).how == "not-matched"
    sa_create = admission_request(ALLOWED)
    sa_create.update(subResource="")
    assert decide(sa_create).how == "not-matched"


def test_the_policy_takes_no_parameter_object():
    # A paramRef is resolved before matchConditions: a missing parameter object would deny (or, with
    # parameterNotFoundAction Allow, skip) every TokenRequest in the cluster, not only the agent's.
    assert "paramKind" not in SPEC
    assert "paramRef" not in BINDING["spec"]


@pytest.mark.parametrize("where,source", every_expression(), ids=[w for w, _ in every_expression()])
def test_every_expression_compiles(where, source):
    compile_expression(where, source)


def test_a_broken_expression_is_a_failure_not_a_skip():
    with pytest.raises(celpy.CELParseError):
        compile_expression("broken", "object.spec.audiences[0 ==")


def test_an_expression_that_fails_to_evaluate_denies_and_is_told_apart_from_a_validation():
    broken = compile_expression("broken", "object.spec.nonexistent == 1")
    saved = list(VALIDATIONS)
    try:
        VALIDATIONS[:] = [({"expression": broken.source}, broken, None)]
        decision = decide(admission_request(ALLOWED))
    finally:
        VALIDATIONS[:] = saved
    assert not decision.admitted and decision.how == "error", decision


def test_every_validation_has_a_one_line_message_naming_the_policy():
    assert VALIDATIONS, "the policy has no validations"
    for validation, _, _ in VALIDATIONS:
        message = validation.get("message", "")
        assert POLICY_NAME in message, validation
        assert "\n" not in message.strip(), "the API server refuses messages with line breaks"
        assert validation.get("reason") == "Forbidden"


# --- the policy's values are the agent's -------------------------------------------------------------


def variable(name: str):
    for n, expr in VARIABLES:
        if n == name:
            return run(expr, {})
    raise AssertionError(f"no variable {name}")


def test_the_allowed_values_are_the_agents_defaults():
    config = (ROOT / "src" / "config" / "mod.rs").read_text()
    audience = re.search(r'env = "IMDS_BROKER_TOKEN_AUDIENCE", default_value = "([^"]+)"', config)
    expiration = re.search(r'env = "IMDS_BROKER_TOKEN_EXPIRATION", default_value_t = (\d+)', config)
    assert audience and expiration, "src/config/mod.rs no longer declares the token flags as expected"
    assert list(variable("allowedAudiences")) == [audience.group(1)]
    assert int(variable("maxExpirationSeconds")) == int(expiration.group(1)) == 600


def test_the_agents_token_request_is_the_allowed_fixture():
    # A tripwire: if the agent changes what it asks for, this fixture (and the policy) must follow. The
    # file is found by what it builds, so a rename of the module does not break the check.
    sources = [p for p in sorted((ROOT / "src").rglob("*.rs")) if "TokenRequestSpec {" in p.read_text()]
    assert len(sources) == 1, f"expected one source building a TokenRequestSpec, found {sources}"
    token, where = sources[0].read_text(), sources[0].relative_to(ROOT)
    for needle in (
        "audiences: Some(vec![self.config.audience.clone()])",
        "expiration_seconds: Some(self.config.expiration_seconds)",
        'api_version: Some("v1".to_owned())',
        'kind: Some("Pod".to_owned())',
        "name: Some(workload.name.clone())",
        "uid: Some(workload.uid.clone())",
    ):
        assert needle in token, f"{where} no longer has {needle!r}"


def test_the_match_condition_names_the_service_account_of_deploy_rbac():
    decision = decide(admission_request(FORBIDDEN["no-binding"][0], username=AGENT))
    assert decision.how == "denied", "the agent of deploy/base/rbac.yaml must be matched"


# --- the agent's requests ----------------------------------------------------------------------------


def test_the_agents_own_token_request_is_admitted():
    decision = decide(admission_request(ALLOWED))
    assert decision.admitted and decision.how == "admitted", decision


def test_a_shorter_lifetime_than_the_maximum_is_admitted():
    # --token-expiration cannot go below 600 (the API server's minimum), so 600 is the only value the
    # default agent sends; anything shorter the API server itself refuses.
    decision = decide(admission_request(token_request(expiration=599)))
    assert decision.admitted, decision


@pytest.mark.parametrize("name", sorted(FORBIDDEN))
def test_a_forbidden_token_request_by_the_agent_is_denied_with_a_message_naming_the_policy(name):
    obj, field = FORBIDDEN[name]
    decision = decide(admission_request(obj))
    assert not decision.admitted, f"{name} was admitted"
    assert decision.how == "denied", f"{name}: denied by an evaluation error, not a validation: {decision}"
    assert f"object.spec.{field}" in decision.validation["expression"], (
        f"{name} was denied by the wrong validation: {decision.validation['expression']}"
    )
    assert POLICY_NAME in decision.message
    assert decision.message.startswith(f"ValidatingAdmissionPolicy '{POLICY_NAME}'")


def test_the_agent_with_extra_user_info_is_still_matched():
    extra = {
        "authentication.kubernetes.io/pod-name": ["imds-broker-abcde"],
        "authentication.kubernetes.io/pod-uid": ["d1c6b1a2-0000-4000-8000-000000000002"],
        "authentication.kubernetes.io/node-name": ["ip-10-0-0-7.ec2.internal"],
    }
    obj, _ = FORBIDDEN["api-server-audience"]
    assert decide(admission_request(obj, extra=extra)).how == "denied"
    assert decide(admission_request(ALLOWED, extra=extra)).how == "admitted"


# --- everyone else -----------------------------------------------------------------------------------


@pytest.mark.parametrize("requester", sorted(OTHER_REQUESTERS))
@pytest.mark.parametrize("name", ["allowed"] + sorted(FORBIDDEN))
def test_other_requesters_are_not_affected(requester, name):
    obj = ALLOWED if name == "allowed" else FORBIDDEN[name][0]
    username = OTHER_REQUESTERS[requester]
    groups = ["system:nodes", "system:authenticated"] if username.startswith("system:node:") else None
    decision = decide(admission_request(obj, username=username, groups=groups))
    assert decision.admitted and decision.how == "not-matched", decision


@pytest.mark.parametrize(
    "user",
    [
        {"username": "system:anonymous", "groups": ["system:unauthenticated"]},
        {"username": "bob"},
        {"username": "", "groups": []},
    ],
    ids=["anonymous", "no-groups", "empty-username"],
)
def test_the_match_condition_never_fails_to_evaluate(user):
    # An error in a matchCondition would, with failurePolicy Fail, deny every TokenRequest in the cluster.
    request = admission_request(FORBIDDEN["a-day"][0])
    request["userInfo"] = user
    assert decide(request).how == "not-matched"
