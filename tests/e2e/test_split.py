"""The DaemonSet's split by privilege, on a real node: `imds-broker iptables reconcile` (root, the
capture) and the server as an unprivileged user with no capabilities at all, sharing only a status
file. A real SDK in a pod gets its own role through the capture; the server holds no capability and
is ready only while the capture side vouches; when the capture side stops, the rules stay (pods fail
closed) and the server stops being ready.

Runs after the single-process scenarios (file order), on the same node; it stops that agent first and
leaves the node without rules.
"""

import re

import harness
from harness import BASE_ROLE_ARN, IMDS_BROKER_BIN, NODE, REGION

ROLE = "e2e-split-role"
SERVER_UID = 65532


class Server(harness.Agent):
    """The server half: no --iptables, run through setpriv as SERVER_UID with every capability gone."""

    def __init__(self, node, status_file):
        # Not harness.Agent.__init__: that starts the process at once.
        self.net, self.kube, self.sts_url, self.logs = node.net, node.kube, node.moto.url, node.logs
        self.status_file = status_file
        self.port = harness.free_port(node.net.node_ip)
        self.metrics_port = harness.free_port()
        self.process = None

    def start(self, extra, wait=True):
        self.extra = extra
        env = {"KUBECONFIG": str(self.kube.kubeconfig), "PATH": "/usr/bin:/bin"}
        self.process = harness.Process("split-server", [
            "setpriv", f"--reuid={SERVER_UID}", f"--regid={SERVER_UID}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
            str(IMDS_BROKER_BIN),
            "--node-name", NODE, "--region", REGION, "--sts-endpoint", self.sts_url,
            "--listen", f"{self.net.node_ip}:{self.port}", "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            "--base-role-arn", BASE_ROLE_ARN, "--pod-wait", "2s",
            "--capture-status-file", str(self.status_file),
            *extra,
        ], self.logs, env=env)
        if wait:
            self.wait_ready()


def capabilities(pid: int) -> dict[str, str]:
    status = open(f"/proc/{pid}/status").read()
    return dict(re.findall(r"^(Cap\w+|Uid):\s+(.*)$", status, re.M))


def ready(server) -> bool:
    return harness.http("GET", f"http://127.0.0.1:{server.metrics_port}/readyz", timeout=2)[0] == 200


def test_an_unprivileged_server_and_a_capture_container_serve_a_pod_its_role(node, versions):
    node.agent.stop()
    harness.run([str(IMDS_BROKER_BIN), "iptables", "uninstall"])
    node.kube.create_service_account("team-s", "default")
    node.kube.create_service_account("team-s", "split", BASE_ROLE_ARN + ROLE)
    pod = node.add_pod(7, "app-split", "team-s", service_account="split")
    status_file = node.logs / "capture-status"
    status_file.unlink(missing_ok=True)
    # Open to the server's user, like the DaemonSet's emptyDir.
    node.logs.chmod(0o755)
    server = Server(node, status_file)
    capture = None
    try:
        server.start([], wait=False)
        harness.wait_for("the server to run as its user", lambda: capabilities(server.process.proc.pid).get("Uid", "")
                         .startswith(str(SERVER_UID)), timeout=10)
        # Once it answers, setpriv has exec'd the agent: its capabilities and readiness are the agent's.
        harness.wait_for("the server's admin port", lambda: harness.http(
            "GET", f"http://127.0.0.1:{server.metrics_port}/healthz", timeout=2)[0] == 200, timeout=10)
        caps = capabilities(server.process.proc.pid)
        assert all(int(caps[c], 16) == 0 for c in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")), caps
        assert not ready(server), "ready before the capture exists"

        capture_metrics = harness.free_port()
        capture = harness.Process("split-capture", [
            str(IMDS_BROKER_BIN), "iptables", "reconcile",
            "--host-interface", node.net.host_if_pattern, "--node-ip", node.net.node_ip,
            "--listen", f"{node.net.node_ip}:{server.port}",
            "--iptables-reconcile-interval", "1s", "--status-file", str(status_file),
            "--metrics-listen", f"127.0.0.1:{capture_metrics}",
        ], node.logs)
        server.wait_ready(timeout=30)
        # The capture container's own counters, for Prometheus (the server has none of its passes).
        capture_status, capture_text = harness.http("GET", f"http://127.0.0.1:{capture_metrics}/metrics")
        assert capture_status == 200
        assert 'imds_broker_iptables_reconciles_total{result="installed"} 1' in capture_text, capture_text
        assert "imds_broker_iptables_repairs_total 0" in capture_text and "imds_broker_ready 1" in capture_text
        assert harness.http("GET", f"http://127.0.0.1:{capture_metrics}/readyz")[0] == 200
        sdk = next(s for s in harness.sdks() if s.name == "boto3/botocore (current)")
        outcome = harness.run_sdk(sdk, pod, server, node.moto.url, node.home)
        passed = outcome.ok and f"assumed-role/{ROLE}/" in outcome.arn
        harness.record("split: unprivileged server", outcome, f"{ROLE} via IMDSv2", passed, versions)
        assert passed, outcome

        # The capture side stops: its vouching is withdrawn, the rules stay.
        capture.stop()
        harness.wait_for("the server to stop being ready", lambda: not ready(server), timeout=10)
        assert any("IMDS-BROKER" in rule for rule in harness.nat_listing("PREROUTING")), "the capture stays"
    finally:
        if capture:
            capture.stop()
        server.stop()
        harness.run([str(IMDS_BROKER_BIN), "iptables", "uninstall"])
        node.topology.remove_pod(7)
