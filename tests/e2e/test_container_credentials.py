"""The container-credentials endpoint end to end: the agent runs with --container-credentials, pods get
the two variables EKS Pod Identity sets and a pod-bound token file (audience pods.eks.amazonaws.com,
minted through TokenRequest as the kubelet does), and real SDKs' default chains find their own pod's
role at http://169.254.170.23/v1/credentials through the agent's capture, with no IMDS request at all
(the agent's per-endpoint counters say which endpoint answered).

Also: a hostNetwork pod (a process in the node's own namespace) gets its role through its token, via the
OUTPUT DNAT and the address on lo; pod A's token used from pod B's namespace gets A's identity (the
token is the identity, as with EKS); a forged token gets nothing.
"""

import base64
import json

import pytest

import harness
from harness import ACCOUNT, BASE_ROLE_ARN

AUDIENCE = "pods.eks.amazonaws.com"
FULL_URI = "http://169.254.170.23/v1/credentials"
ROLE_A = "e2e-cc-role-a"
ROLE_B = "e2e-cc-role-b"
ROLE_HOST = "e2e-cc-host-role"
SDKS = [
    harness.Sdk("boto3/botocore (current)", "container", [str(harness.VENV / "bin" / "python"),
                                                          str(harness.ROOT / "tests" / "e2e" / "py_probe.py")]),
    harness.Sdk("AWS CLI v1 (current)", "container", [str(harness.VENV_CLI / "bin" / "aws"), "sts",
                                                      "get-caller-identity", "--output", "json"]),
    harness.Sdk("JS v3 default chain", "container", ["node", str(harness.JS_DIR / "chain.mjs")]),
    harness.Sdk("Rust aws-config default chain", "container", [str(harness.RUST_PROBE_BIN)]),
]
STATE = {}


@pytest.fixture(scope="module")
def cc(node):
    """The node's agent with --container-credentials; pods A and B with token files, a hostNetwork pod."""
    node.agent.restart(["--container-credentials"])
    kube = node.kube
    kube.create_service_account("cc-a", "default")
    kube.create_service_account("cc-b", "default")
    kube.create_service_account("cc-host", "node-agent", BASE_ROLE_ARN + ROLE_HOST)
    tokens = node.logs / "cc-tokens"
    tokens.mkdir(exist_ok=True)

    def pod(n: int, name: str, ns: str, role: str) -> tuple:
        net = node.topology.add_pod(n)
        obj = kube.create_pod(ns, name, net.ip, role=role)
        return net, obj

    def token_file(name: str, token: str) -> str:
        path = tokens / name
        path.write_text(token)
        return str(path)

    a, a_obj = pod(61, "cc-app-a", "cc-a", ROLE_A)
    b, b_obj = pod(62, "cc-app-b", "cc-b", ROLE_B)
    host_obj = kube.create_pod("cc-host", "cc-node-agent", node.net.node_ip, service_account="node-agent",
                               host_network=True)
    STATE.update(
        a=a, b=b, host=harness.HostNet(),
        token_a=token_file("a", kube.token(a_obj, AUDIENCE)),
        token_b=token_file("b", kube.token(b_obj, AUDIENCE)),
        token_host=token_file("host", kube.token(host_obj, AUDIENCE)),
        forged=token_file("forged", forge(kube.token(a_obj, AUDIENCE), b_obj)),
    )
    yield STATE
    node.agent.restart([])


def forge(token: str, victim: dict) -> str:
    """`token` with its claims rewritten to name `victim`, keeping the original signature."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["kubernetes.io"]["namespace"] = victim["metadata"]["namespace"]
    claims["kubernetes.io"]["pod"] = {"name": victim["metadata"]["name"], "uid": victim["metadata"]["uid"]}
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"{header}.{forged}.{signature}"


def with_js_chain(versions: dict) -> dict:
    """The session's SDK versions plus the JS v3 default chain's (its STS client's package)."""
    package = harness.JS_DIR / "node_modules" / "@aws-sdk" / "client-sts" / "package.json"
    try:
        js = json.loads(package.read_text())["version"]
    except (OSError, ValueError):
        js = "?"
    return {**versions, "JS v3 default chain": f"@aws-sdk/client-sts {js}"}


def env_with(token_file: str, uri: str = FULL_URI) -> dict:
    return {"AWS_CONTAINER_CREDENTIALS_FULL_URI": uri, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": token_file}


def check(node, versions, scenario: str, sdk, where, token_file: str, role: str | None, uri: str = FULL_URI):
    outcome = node.run_sdk(sdk, where, env=env_with(token_file, uri))
    if role is None:
        passed = not outcome.ok and outcome.imds == "container refused" and outcome.arn is None
        expected = "refused by the container endpoint, no credentials"
    else:
        expected_arn = f"arn:aws:sts::{ACCOUNT}:assumed-role/{role}/"
        passed = outcome.ok and outcome.arn.startswith(expected_arn) and outcome.imds == "container 200"
        expected = f"{role} via the container endpoint only"
    harness.record(scenario, outcome, expected, passed, with_js_chain(versions))
    assert passed, f"{sdk.name} ({scenario}): wanted {expected}, got {outcome}"


def test_the_capture_also_sends_169_254_170_23_to_the_agent(node, cc):
    chain = harness.nat_listing("IMDS-BROKER")
    assert any("169.254.170.23/32" in rule for rule in chain), chain
    local = harness.nat_listing("IMDS-BROKER-LOCAL")
    assert local and local[0][-2:] == ["--to-destination", f"{node.net.node_ip}:{node.agent.port}"], local
    addresses = harness.run(["ip", "-o", "-4", "addr", "show", "dev", "lo"]).stdout
    assert "169.254.170.23/32" in addresses, addresses


def test_with_an_ipv6_node_ip_fd00_ec2_23_is_captured_too(node, cc):
    chain = harness.nat_listing("IMDS-BROKER", tool="ip6tables")
    assert any("fd00:ec2::23/128" in rule for rule in chain), chain
    local = harness.nat_listing("IMDS-BROKER-LOCAL", tool="ip6tables")
    assert local and local[0][-2:] == ["--to-destination", f"[{node.net.node_ip6}]:{node.agent.port}"], local
    addresses = harness.run(["ip", "-o", "-6", "addr", "show", "dev", "lo"]).stdout
    assert "fd00:ec2::23/128" in addresses, addresses


@pytest.mark.parametrize("sdk", SDKS, ids=[s.name for s in SDKS])
def test_each_sdk_gets_its_own_pods_role_from_the_container_endpoint(node, cc, versions, sdk):
    check(node, versions, "container: pod A, own token", sdk, cc["a"], cc["token_a"], ROLE_A)
    check(node, versions, "container: pod B, own token", sdk, cc["b"], cc["token_b"], ROLE_B)


@pytest.mark.parametrize("sdk", SDKS, ids=[s.name for s in SDKS])
def test_a_host_network_pod_gets_its_own_role_through_its_token(node, cc, versions, sdk):
    check(node, versions, "container: hostNetwork pod", sdk, cc["host"], cc["token_host"], ROLE_HOST)


def test_pod_as_token_from_pod_bs_namespace_gets_pod_as_identity_only(node, cc, versions):
    check(node, versions, "container: A's token in B's netns", SDKS[0], cc["b"], cc["token_a"], ROLE_A)


@pytest.mark.parametrize("sdk", SDKS, ids=[s.name for s in SDKS])
def test_a_forged_token_gets_nothing(node, cc, versions, sdk):
    check(node, versions, "container: forged token (claims B)", sdk, cc["b"], cc["forged"], None)
