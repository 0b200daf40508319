"""End-to-end: real SDKs in network-namespace pods reach 169.254.169.254 with no endpoint override and get
their own pod's role, through the agent's own iptables capture, the kube API double and moto as STS.

Tests run in file order against one node; each scenario leaves the node as the next one expects.
"""

import time

import pytest

import harness
from harness import ACCOUNT, BASE_ROLE_ARN

ROLE_SA = "e2e-irsa-role"  # via the service account annotation eks.amazonaws.com/role-arn
ROLE_POD = "e2e-kube2iam-role"  # via the pod annotation iam.amazonaws.com/role (a name, completed by the base)
ROLE_NEW = "e2e-successor-role"  # the pod that takes over pod B's IP
ALL_ROLES = (ROLE_SA, ROLE_POD, ROLE_NEW)
SDKS = {sdk.name: sdk for sdk in harness.sdks()}
STATE = {}


@pytest.fixture(scope="session")
def pods(node):
    kube = node.kube
    for ns in ("team-a", "team-b", "team-c"):
        kube.create_service_account(ns, "default")
    kube.create_service_account("team-a", "reader", BASE_ROLE_ARN + ROLE_SA)
    STATE["a"] = node.add_pod(1, "app-a", "team-a", service_account="reader")
    STATE["b"] = node.add_pod(2, "app-b", "team-b", role=ROLE_POD)
    STATE["none"] = node.add_pod(3, "app-none", "team-c")
    STATE["role_b"] = ROLE_POD
    return STATE


def expected_imds(sdk):
    return "IMDSv1" if sdk.v1_only else "IMDSv2"


def check_role(node, versions, scenario, sdk, pod, role):
    outcome = node.run_sdk(sdk, pod)
    expected_arn = f"arn:aws:sts::{ACCOUNT}:assumed-role/{role}/"
    passed = outcome.ok and outcome.arn.startswith(expected_arn) and outcome.imds == expected_imds(sdk)
    harness.record(scenario, outcome, f"{role} via {expected_imds(sdk)}", passed, versions)
    assert passed, f"{sdk.name} in {pod.ns}: wanted {role} via {expected_imds(sdk)}, got {outcome}"


def test_the_capture_is_the_first_prerouting_rule_and_dnats_to_the_node(node):
    prerouting = harness.nat_listing("PREROUTING")
    assert prerouting and "IMDS-BROKER" in prerouting[0], prerouting
    assert sum("IMDS-BROKER" in rule for rule in prerouting) == 1
    chain = harness.nat_listing("IMDS-BROKER")
    assert len(chain) == 1
    assert chain[0][-2:] == ["--to-destination", f"{node.net.node_ip}:{node.agent.port}"]
    assert ["-i", node.net.host_if_pattern] == chain[0][2:4]


def test_with_an_ipv6_node_ip_the_ipv6_metadata_address_is_captured_too(node):
    prerouting = harness.nat_listing("PREROUTING", tool="ip6tables")
    assert prerouting and "IMDS-BROKER" in prerouting[0], prerouting
    assert prerouting[0][:2] == ["-d", "fd00:ec2::254/128"]
    chain = harness.nat_listing("IMDS-BROKER", tool="ip6tables")
    assert len(chain) == 1
    assert chain[0][-2:] == ["--to-destination", f"[{node.net.node_ip6}]:{node.agent.port}"]


@pytest.mark.parametrize("sdk_name", list(SDKS))
def test_each_sdk_gets_its_own_pods_role(node, pods, versions, sdk_name):
    sdk = SDKS[sdk_name]
    check_role(node, versions, "pod A (SA annotation)", sdk, pods["a"], ROLE_SA)
    check_role(node, versions, "pod B (pod annotation)", sdk, pods["b"], ROLE_POD)


@pytest.mark.parametrize("sdk_name", list(SDKS))
def test_a_pod_without_a_role_gets_no_credentials(node, pods, versions, sdk_name):
    sdk = SDKS[sdk_name]
    outcome = node.run_sdk(sdk, pods["none"])
    leaked = any(role in outcome.raw for role in ALL_ROLES)
    passed = not outcome.ok and outcome.arn is None and outcome.no_credentials and not leaked
    harness.record("pod without a role", outcome, "no credentials", passed, versions)
    assert passed, f"{sdk.name} in a role-less pod: {outcome}"


def test_a_pod_without_a_role_sees_no_role_name(node, pods):
    for token in (True, False):
        status, body = pods["none"].imds_get("/latest/meta-data/iam/security-credentials/", token=token)
        assert status == 404, (status, body)
        assert not any(role in body for role in ALL_ROLES)
        for role in ALL_ROLES:
            status, body = pods["none"].imds_get(f"/latest/meta-data/iam/security-credentials/{role}", token=token)
            assert status == 404 and "AccessKeyId" not in body, (role, status, body)


def test_a_new_pod_reusing_an_ip_gets_only_its_own_role(node, pods, versions):
    old_ip = pods["b"].ip
    node.kube.delete_pod("team-b", "app-b")
    node.topology.remove_pod(2)
    # The successor is created and asked at once: no waiting for the agent to catch up.
    pods["b"] = node.add_pod(2, "app-b-successor", "team-b", role=ROLE_NEW)
    pods["role_b"] = ROLE_NEW
    assert pods["b"].ip == old_ip
    for name in ("boto3/botocore (current)", "botocore 1.13.22 (pre-IMDSv2)", "Rust aws-config default chain"):
        check_role(node, versions, "same IP, new pod", SDKS[name], pods["b"], ROLE_NEW)


def test_a_deleted_capture_rule_comes_back_and_is_counted(node, pods):
    repairs = harness.metric_sum(node.agent.metrics(), "imds_broker_iptables_repairs_total")
    jump = next(rule for rule in harness.nat_listing("PREROUTING") if "IMDS-BROKER" in rule)
    harness.run(["iptables", "-w", "5", "-t", "nat", "-D", "PREROUTING", *jump])
    harness.wait_for("the jump to come back", lambda: any("IMDS-BROKER" in r for r in harness.nat_listing(
        "PREROUTING")), timeout=10)
    harness.wait_for("the repair to be counted", lambda: harness.metric_sum(
        node.agent.metrics(), "imds_broker_iptables_repairs_total") > repairs, timeout=10)
    status, _ = pods["a"].imds_get("/latest/meta-data/iam/security-credentials/")
    assert status == 200


def test_a_demoted_capture_rule_moves_back_to_the_top(node):
    foreign = ["-s", "10.199.0.250/32", "-m", "comment", "--comment", "e2e: a foreign rule", "-j", "RETURN"]
    harness.run(["iptables", "-w", "5", "-t", "nat", "-I", "PREROUTING", "1", *foreign])
    try:
        harness.wait_for("the jump to be first again", lambda: "IMDS-BROKER" in harness.nat_listing("PREROUTING")[0],
                         timeout=10)
        prerouting = harness.nat_listing("PREROUTING")
        assert sum("IMDS-BROKER" in rule for rule in prerouting) == 1
        assert foreign in prerouting, "the agent never removes rules that are not its own"
    finally:
        harness.run(["iptables", "-w", "5", "-t", "nat", "-D", "PREROUTING", *foreign], check=False)


def test_imdsv2_required_refuses_v1_only_sdks_and_serves_the_others(node, pods, versions):
    node.agent.restart(["--imdsv2", "required"])
    failures = []
    try:
        for sdk in SDKS.values():
            outcome = node.run_sdk(sdk, pods["a"])
            if sdk.v1_only:
                passed = not outcome.ok and outcome.imds == "v1 refused (401)"
                expected = "refused (401), no credentials"
            else:
                passed = outcome.ok and f"assumed-role/{ROLE_SA}/" in outcome.arn and outcome.imds == "IMDSv2"
                expected = f"{ROLE_SA} via IMDSv2"
            harness.record("--imdsv2 required", outcome, expected, passed, versions)
            if not passed:
                failures.append(f"{sdk.name}: {outcome}")
    finally:
        node.agent.restart([])
    assert not failures, "\n".join(failures)


def test_while_the_agent_is_down_pods_are_refused_and_then_recover_unaided(node, pods, versions):
    node.agent.kill()
    assert pods["a"].dial("169.254.169.254", 80) == "refused"
    assert any("IMDS-BROKER" in rule for rule in harness.nat_listing("PREROUTING")), "the capture stays"
    node.agent.start(node.agent.extra, wait=False)
    sdk = SDKS["boto3/botocore (current)"]
    started = time.monotonic()
    outcome = harness.wait_for("the SDK to get credentials again", lambda: (
        lambda o: o if o.ok else None)(node.run_sdk(sdk, pods["a"])), timeout=30, interval=0.2)
    passed = f"assumed-role/{ROLE_SA}/" in outcome.arn
    harness.record(f"after agent restart ({time.monotonic() - started:.1f}s)", outcome, f"{ROLE_SA} via IMDSv2",
                   passed, versions)
    assert passed, outcome
    assert sum("IMDS-BROKER" in rule for rule in harness.nat_listing("PREROUTING")) == 1


def shipped_uninstall_args() -> list[str]:
    """The arguments deploy/uninstall's DaemonSet gives the binary (tests/deploy checks that kustomize
    renders them unchanged and with the capture container's privileges)."""
    import yaml  # a dependency of moto[server], in the e2e venv

    ds = yaml.safe_load((harness.ROOT / "deploy" / "uninstall" / "daemonset.yaml").read_text())
    (step,) = [c for c in ds["spec"]["template"]["spec"]["initContainers"] if c["name"] == "uninstall"]
    assert "command" not in step, "the image's entrypoint is the binary"
    return [str(a) for a in step["args"]]


def test_uninstall_removes_every_rule_and_is_idempotent(node):
    node.agent.stop()
    assert any("IMDS-BROKER" in rule for rule in harness.nat_listing("PREROUTING")), "nothing to uninstall"
    for _ in range(2):
        result = harness.run([str(harness.IMDS_BROKER_BIN), *shipped_uninstall_args()])
        assert result.returncode == 0
    for tool in ("iptables", "ip6tables"):
        for table in ("nat", "filter"):
            listing = harness.run([tool, "-w", "5", "-t", table, "-S"]).stdout
            assert "IMDS-BROKER" not in listing, (tool, table, listing)
