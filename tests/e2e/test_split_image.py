"""The DaemonSet's two containers from the agent image (deploy/image), run by podman with exactly the
manifest's security settings: the capture as root with only NET_ADMIN and NET_RAW, the server as
65532:65532 with no capability; both on the host network, with a read-only root filesystem, no
privilege escalation and the runtime's default seccomp profile, sharing only the status directory.
Real SDKs in two pods get their own roles (one from the service account, one from the pod annotation)
through the image's iptables, whose rules land in the node's own backend.

The image comes from `deploy/image/build.sh` (tests/run.sh builds it and sets IMDS_BROKER_IMAGE);
without IMDS_BROKER_IMAGE the test is skipped, with it a missing image fails. Containers carry the
harness prefix as a label, so `harness.py cleanup` removes them even after a crash.

Runs after test_split.py (file order), on the same node; it stops the single-process agent if it
still runs and leaves the node without rules.
"""

import json
import os
import re
from pathlib import Path

import pytest

import harness
from harness import BASE_ROLE_ARN, IMDS_BROKER_BIN, NODE, REGION

IMAGE = os.environ.get("IMDS_BROKER_IMAGE", "")
SERVER_UID = 65532
IRSA_ROLE = "e2e-image-irsa-role"
POD_ROLE = "e2e-image-pod-role"
CAP_NET_ADMIN, CAP_NET_RAW = 12, 13
# The pod spec's securityContext in podman's words; seccomp stays podman's default (RuntimeDefault).
# Kubernetes mounts no tmpfs under a read-only root: neither may podman.
COMMON = ["--network", "host", "--read-only", "--read-only-tmpfs=false", "--security-opt", "no-new-privileges",
          "--cap-drop", "all", *harness.PODMAN_LIMITS]

pytestmark = pytest.mark.skipif(not IMAGE, reason="IMDS_BROKER_IMAGE unset (deploy/image/build.sh builds the image)")


def podman(*args: str, check: bool = True, timeout: float = 60):
    return harness.run([*harness.podman_argv(), *args], check=check, timeout=timeout)


class Container:
    """One detached container; its logs are copied to the harness logs when it is removed."""

    def __init__(self, node, role: str, args: list[str]):
        self.name = f"{node.net.prefix}-image-{role}"
        self.log_path = node.logs / f"image-{role}.log"
        podman("rm", "--force", "--ignore", self.name)
        podman("run", "--detach", "--name", self.name, "--label", f"{harness.PODMAN_LABEL}={node.net.prefix}",
               *args)

    def state(self) -> dict:
        return json.loads(podman("inspect", "--format", "{{json .State}}", self.name).stdout)

    def check_running(self) -> None:
        if not self.state()["Running"]:
            raise RuntimeError(f"{self.name} exited:\n{self.logs()}")

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def proc_status(self) -> dict[str, str]:
        status = Path(f"/proc/{self.state()['Pid']}/status").read_text()
        return dict(re.findall(r"^(\w+):\s+(.*)$", status, re.M))

    def remove(self) -> None:
        self.log_path.write_text(self.logs())
        podman("rm", "--force", "--ignore", "--time", "10", self.name, check=False)


class ImageServer(harness.Agent):
    """The server container, as harness.Agent for the SDK runs (its metrics on the host's loopback)."""

    def __init__(self, node, container: Container, port: int, metrics_port: int):
        self.net, self.kube, self.sts_url, self.logs = node.net, node.kube, node.moto.url, node.logs
        self.container, self.port, self.metrics_port = container, port, metrics_port
        self.process = None

    def alive(self) -> bool:
        self.container.check_running()
        return harness.http("GET", f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=2)[0] == 200

    def ready(self) -> bool:
        self.container.check_running()
        return harness.http("GET", f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2)[0] == 200


def caps(status: dict[str, str], name: str) -> int:
    return int(status[name], 16)


def test_the_image_runs_the_daemonsets_two_containers_and_pods_get_their_own_roles(node, versions):
    image = podman("image", "inspect", "--format", "{{json .Labels}}", IMAGE, check=False)
    assert image.returncode == 0, f"no image {IMAGE}: run deploy/image/build.sh ({image.stderr.strip()})"
    labels = json.loads(image.stdout)
    node.agent.stop()
    harness.run([str(IMDS_BROKER_BIN), "iptables", "uninstall"])
    node.kube.create_service_account("team-i", "default")
    node.kube.create_service_account("team-i", "irsa", BASE_ROLE_ARN + IRSA_ROLE)
    irsa_pod = node.add_pod(8, "app-irsa", "team-i", service_account="irsa")
    annotated_pod = node.add_pod(9, "app-annotated", "team-i", role=POD_ROLE)
    # The emptyDir both containers mount: written by the capture (root), read by the server.
    status_dir = node.logs / "image-status"
    status_dir.mkdir(mode=0o755, exist_ok=True)
    # The node's xtables lock, a hostPath of type FileOrCreate.
    lock = Path("/run/xtables.lock")
    created_lock = not lock.exists()
    lock.touch()
    port, metrics_port = harness.free_port(node.net.node_ip), harness.free_port()
    containers: list[Container] = []
    try:
        server_container = Container(node, "server", [
            *COMMON, "--user", f"{SERVER_UID}:{SERVER_UID}",
            "--volume", f"{status_dir}:/run/imds-broker:ro",
            # The doubles' kubeconfig instead of the service account's in-cluster credentials.
            "--volume", f"{node.kube.kubeconfig}:/etc/imds-broker/kubeconfig:ro",
            "--env", "KUBECONFIG=/etc/imds-broker/kubeconfig", "--env", f"NODE_NAME={NODE}",
            "--env", f"AWS_REGION={REGION}",
            IMAGE,
            "--capture-status-file=/run/imds-broker/capture", f"--listen={node.net.node_ip}:{port}",
            "--log-format=json", f"--metrics-listen=127.0.0.1:{metrics_port}", "--sts-endpoint", node.moto.url,
            "--base-role-arn", BASE_ROLE_ARN, "--pod-wait", "2s",
        ])
        containers.append(server_container)
        server = ImageServer(node, server_container, port, metrics_port)
        harness.wait_for("the server container to listen", server.alive, timeout=30)
        assert not server.ready(), "ready before the capture exists"

        capture = Container(node, "capture", [
            *COMMON, "--user", "0:0", "--cap-add", "NET_ADMIN,NET_RAW",
            "--volume", f"{lock}:/run/xtables.lock", "--volume", f"{status_dir}:/run/imds-broker",
            IMAGE,
            "iptables", "reconcile", f"--node-ip={node.net.node_ip}", f"--listen={node.net.node_ip}:{port}",
            f"--host-interface={node.net.host_if_pattern}", "--iptables-reconcile-interval", "1s",
            "--status-file=/run/imds-broker/capture",
        ])
        containers.append(capture)
        harness.wait_for("the server container to be ready", server.ready, timeout=30)

        # What the kernel says of the two processes: the manifest's users and capabilities, no new
        # privileges, seccomp filtering (2).
        server_status, capture_status = server_container.proc_status(), capture.proc_status()
        assert server_status["Uid"].split() == [str(SERVER_UID)] * 4, server_status["Uid"]
        assert server_status["Gid"].split() == [str(SERVER_UID)] * 4, server_status["Gid"]
        for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert caps(server_status, name) == 0, (name, server_status[name])
        assert capture_status["Uid"].split() == ["0"] * 4, capture_status["Uid"]
        wanted = 1 << CAP_NET_ADMIN | 1 << CAP_NET_RAW
        for name in ("CapPrm", "CapEff", "CapBnd"):
            assert caps(capture_status, name) == wanted, (name, capture_status[name])
        for status in (server_status, capture_status):
            assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
        # Read-only roots: not even root in the capture container may write to it.
        for container in (server_container, capture):
            written = podman("exec", container.name, "/bin/sh", "-c", "echo x > /probe", check=False)
            assert written.returncode != 0 and "Read-only file system" in written.stderr, written

        # The image's iptables wrote to the node's backend: the host's own iptables lists the capture.
        host_backend = "nft" if "nf_tables" in harness.run(["iptables", "-V"]).stdout else "legacy"
        assert f"using iptables-{host_backend}" in capture.logs(), capture.logs()
        assert any("IMDS-BROKER" in " ".join(rule) for rule in harness.nat_listing("PREROUTING")), \
            "the host's iptables does not see the capture"

        sdks = {s.name: s for s in harness.sdks()}
        for pod, sdk, role, expected in (
            (irsa_pod, sdks["boto3/botocore (current)"], IRSA_ROLE, "service account's role"),
            (annotated_pod, sdks["Rust aws-config default chain"], POD_ROLE, "pod annotation's role"),
        ):
            outcome = harness.run_sdk(sdk, pod, server, node.moto.url, node.home)
            passed = outcome.ok and f"assumed-role/{role}/" in (outcome.arn or "") and outcome.imds == "IMDSv2"
            harness.record("image: capture + server containers", outcome, f"{role} via IMDSv2", passed, versions)
            assert passed, (expected, outcome)

        # The binary in the image is the one its labels name.
        info = {key: value for key, value in server.metrics().items() if key[0] == "imds_broker_build_info"}
        assert info == {("imds_broker_build_info", (("revision", labels["org.opencontainers.image.revision"]),
                                                    ("version", labels["org.opencontainers.image.version"]))): 1}, info
    finally:
        for container in reversed(containers):
            container.remove()
        harness.run([str(IMDS_BROKER_BIN), "iptables", "uninstall"], check=False)
        node.topology.remove_pod(8)
        node.topology.remove_pod(9)
        if created_lock:
            lock.unlink(missing_ok=True)
