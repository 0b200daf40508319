"""A node in a box, for the end-to-end suite and the demo: pods as network namespaces, the kube API
double, moto as STS, the real agent with its iptables capture, and real SDKs run inside the pods.

Topology (everything is created here and removed on exit, even on failure):

    root namespace                                   pod namespace <prefix>-podN
    dummy <prefix>-node 10.254.X.1/32  <- agent, moto    eth0 10.199.X.(10+N)/32
    (an empty bridge where the kernel has no dummy driver)
    veth <prefix>hN (no address, proxy_arp) <--------->  default via 169.254.1.1 (the host side)
    route 10.199.X.(10+N)/32 dev <prefix>hN

Like Calico: a /32 per pod routed to its host-side veth, and a link-local gateway the host side answers
for. A pod's 169.254.169.254:80 enters the root namespace on <prefix>hN, where the agent's rule DNATs it
to the dummy address. A FORWARD drop for <prefix>h+ keeps pod traffic from ever leaving the node, so
nothing reaches any address this harness did not create, whatever the agent does.

An outsider (`Topology.add_outsider`) is a namespace wired like a pod but behind <prefix>xN, an interface
the agent's --host-interface pattern does not match: what the node's other interfaces look like to the
agent's rules. It gets the same FORWARD drop.

Only the standard library is used; the venvs hold the SDKs under test.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "target"
IMDS_BROKER_BIN = Path(os.environ.get("IMDS_BROKER_BIN", TARGET / "debug" / "imds-broker"))
DOUBLES_BIN = Path(os.environ.get("DOUBLES_BIN", TARGET / "debug" / "examples" / "doubles"))
RUST_PROBE_BIN = Path(os.environ.get("RUST_PROBE_BIN", TARGET / "debug" / "examples" / "rust-probe"))
VENV = TARGET / "e2e-venv"
VENV_CLI = TARGET / "e2e-venv-cli"
VENV_LEGACY = TARGET / "e2e-venv-legacy"
JS_DIR = ROOT / "tests" / "e2e" / "js"

NODE = "e2e-node"
ACCOUNT = "123456789012"
BASE_ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/"
REGION = "us-east-1"
GATEWAY = "169.254.1.1"


def log(message: str) -> None:
    print(f"[e2e] {message}", file=sys.stderr, flush=True)


def run(argv: list[str], *, check: bool = True, timeout: float = 30, env: dict | None = None,
        input: str | None = None) -> subprocess.CompletedProcess:
    """Runs a command with a deadline; output is captured as text."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, input=input,
                            stdin=None if input is not None else subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def wait_for(what: str, predicate, timeout: float = 20, interval: float = 0.1):
    """Polls `predicate` until it returns something truthy, or fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:  # noqa: BLE001 - kept for the failure message
            last_error = error
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_error})"
                                                                            if last_error else ""))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- network


@dataclass
class Net:
    """Names and addresses of one harness instance; `prefix` keeps the suite and the demo apart."""

    prefix: str = "imdsb"
    octet: int = 0

    @property
    def node_if(self) -> str:
        return f"{self.prefix}-node"

    @property
    def node_ip(self) -> str:
        return f"10.254.{self.octet}.1"

    @property
    def node_ip6(self) -> str:
        """An IPv6 node address (a ULA of our own), so the agent also installs its ip6tables rules."""
        return str(ipaddress.IPv6Address(f"fd99:254:{self.octet}::1"))

    @property
    def host_if_pattern(self) -> str:
        return f"{self.prefix}h+"

    @property
    def outsider_if_pattern(self) -> str:
        """Host-side interfaces of namespaces that are not pods (not matched by `host_if_pattern`)."""
        return f"{self.prefix}x+"

    def pod_ns(self, n: int) -> str:
        return f"{self.prefix}-pod{n}"

    def host_if(self, n: int) -> str:
        return f"{self.prefix}h{n}"

    def pod_ip(self, n: int) -> str:
        return f"10.199.{self.octet}.{10 + n}"


@dataclass
class PodNet:
    """One pod's network namespace."""

    net: Net
    n: int

    @property
    def ns(self) -> str:
        return self.net.pod_ns(self.n)

    @property
    def ip(self) -> str:
        return self.net.pod_ip(self.n)

    def exec(self, argv: list[str], *, env: dict | None = None, timeout: float = 60,
             check: bool = False) -> subprocess.CompletedProcess:
        """Runs `argv` inside the pod's namespace."""
        return run(["ip", "netns", "exec", self.ns, *argv], env=env, timeout=timeout, check=check)

    def dial(self, host: str, port: int, timeout: float = 2.0) -> str:
        """Opens a TCP connection from the pod: 'connected', 'refused' or 'timeout'."""
        code = (
            "import socket,sys\n"
            f"s=socket.socket(); s.settimeout({timeout})\n"
            "try:\n"
            f"    s.connect(({host!r},{port})); print('connected')\n"
            "except ConnectionRefusedError: print('refused')\n"
            "except (socket.timeout, TimeoutError): print('timeout')\n"
            "except OSError as e: print('error:'+str(e))\n"
        )
        return self.exec([sys.executable, "-c", code], timeout=timeout + 10).stdout.strip()

    def imds_get(self, path: str, token: bool = True) -> tuple[int, str]:
        """A raw IMDS request from the pod (optionally IMDSv2): (status, body)."""
        code = (
            "import json,urllib.request,urllib.error\n"
            "h={}\n"
            f"if {token!r}:\n"
            "    r=urllib.request.Request('http://169.254.169.254/latest/api/token',method='PUT',"
            "headers={'X-aws-ec2-metadata-token-ttl-seconds':'60'})\n"
            "    h={'X-aws-ec2-metadata-token':urllib.request.urlopen(r,timeout=3).read().decode()}\n"
            "try:\n"
            f"    resp=urllib.request.urlopen(urllib.request.Request('http://169.254.169.254'+{path!r},"
            "headers=h),timeout=3); print(json.dumps([resp.status,resp.read().decode()]))\n"
            "except urllib.error.HTTPError as e: print(json.dumps([e.code,e.read().decode()]))\n"
        )
        result = self.exec([sys.executable, "-c", code], timeout=15)
        if result.returncode != 0:
            raise RuntimeError(f"IMDS request from {self.ns} failed: {result.stderr.strip()}")
        status, body = json.loads(result.stdout)
        return status, body


class Topology:
    """Creates and removes the node's test interfaces, pod namespaces and the safety rules."""

    def __init__(self, net: Net):
        self.net = net
        self.pods: dict[int, PodNet] = {}

    def setup(self) -> None:
        cleanup(self.net)  # leftovers of a run that was killed
        n = self.net
        # A dummy interface holds the node's address; kernels without the dummy driver get an empty
        # bridge, which holds a local address just as well.
        if run(["ip", "link", "add", n.node_if, "type", "dummy"], check=False).returncode != 0:
            run(["ip", "link", "add", n.node_if, "type", "bridge"])
        run(["ip", "addr", "add", f"{n.node_ip}/32", "dev", n.node_if])
        run(["ip", "-6", "addr", "add", f"{n.node_ip6}/128", "dev", n.node_if, "nodad"])
        run(["ip", "link", "set", n.node_if, "up"])
        for tool in ("iptables", "ip6tables"):
            for pattern in (n.host_if_pattern, n.outsider_if_pattern):
                # Pods (and outsiders) may only reach addresses on this node, never be forwarded elsewhere.
                run([tool, "-w", "5", "-I", "FORWARD", "1", "-i", pattern, "-m", "comment",
                     "--comment", f"{n.prefix} e2e: pods stay on the node", "-j", "DROP"], check=False)

    def add_outsider(self, i: int) -> PodNet:
        """A namespace wired like pod `i` but behind <prefix>x<i>, which --host-interface does not match."""
        return self.add_pod(i, host_if=f"{self.net.prefix}x{i}")

    def add_pod(self, i: int, host_if: str | None = None) -> PodNet:
        pod = PodNet(self.net, i)
        host_if, ns = host_if or self.net.host_if(i), pod.ns
        run(["ip", "netns", "add", ns])
        run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns])
        run(["sysctl", "-qw", f"net.ipv4.conf.{host_if}.proxy_arp=1"])
        run(["ip", "link", "set", host_if, "up"])
        run(["ip", "route", "add", f"{pod.ip}/32", "dev", host_if])
        mac = Path(f"/sys/class/net/{host_if}/address").read_text().strip()
        for argv in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", f"{pod.ip}/32", "dev", "eth0"],
            ["ip", "link", "set", "eth0", "up"],
            ["ip", "route", "add", GATEWAY, "dev", "eth0", "scope", "link"],
            ["ip", "route", "add", "default", "via", GATEWAY, "dev", "eth0"],
            # Proxy ARP would answer too; a permanent entry saves the first request's ARP round trip.
            ["ip", "neigh", "replace", GATEWAY, "lladdr", mac, "dev", "eth0", "nud", "permanent"],
        ):
            run(["ip", "netns", "exec", ns, *argv])
        self.pods[i] = pod
        return pod

    def remove_pod(self, i: int) -> None:
        run(["ip", "netns", "del", self.net.pod_ns(i)], check=False)
        for host_if in (self.net.host_if(i), f"{self.net.prefix}x{i}"):
            if Path(f"/sys/class/net/{host_if}").exists():
                run(["ip", "link", "del", host_if], check=False)
        self.pods.pop(i, None)

    def teardown(self) -> None:
        cleanup(self.net)


# Containers of the image test (test_split_image.py) carry this label, valued with the harness prefix.
PODMAN_LABEL = "imds-broker-e2e"
# podman's default limits exceed what this CI's hosts allow a container.
PODMAN_LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
_podman_argv: list[str] = []


def podman_argv() -> list[str]:
    """podman with the global flags deploy/image/build.sh builds with (runtime, cgroups, storage)."""
    if not _podman_argv:
        flags = run([str(ROOT / "deploy" / "image" / "build.sh"), "--podman-args"]).stdout.split()
        _podman_argv.extend(["podman", *flags])
    return _podman_argv


def cleanup(net: Net) -> None:
    """Removes everything a harness with `net.prefix` may have created (idempotent, never raises)."""
    # Containers first: a capture container left running would put its rules back.
    if shutil.which("podman"):
        with contextlib.suppress(Exception):
            listed = run([*podman_argv(), "ps", "--all", "--quiet", "--filter",
                          f"label={PODMAN_LABEL}={net.prefix}"], check=False).stdout.split()
            if listed:
                run([*podman_argv(), "rm", "--force", "--time", "5", *listed], check=False, timeout=60)
    namespaces = run(["ip", "netns", "list"], check=False).stdout
    for line in namespaces.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(f"{net.prefix}-pod"):
            run(["ip", "netns", "del", name], check=False)
    links = run(["ip", "-o", "link", "show"], check=False).stdout
    for match in re.finditer(r"^\d+: ([^:@]+)[:@]", links, re.M):
        name = match.group(1)
        if name == net.node_if or re.fullmatch(rf"{re.escape(net.prefix)}[hx]\d+", name):
            run(["ip", "link", "del", name], check=False)
    for tool in ("iptables", "ip6tables"):
        rules = run([tool, "-w", "5", "-S", "FORWARD"], check=False).stdout
        for line in rules.splitlines():
            if f"{net.prefix} e2e: pods stay on the node" in line and line.startswith("-A FORWARD"):
                spec = split_rule(line)[2:]
                run([tool, "-w", "5", "-D", "FORWARD", *spec], check=False)
    if IMDS_BROKER_BIN.exists():
        run([str(IMDS_BROKER_BIN), "iptables", "uninstall"], check=False)


def split_rule(line: str) -> list[str]:
    """Splits a line of `iptables -S` (double quotes, backslash escapes)."""
    import shlex

    return shlex.split(line)


def nat_listing(chain: str, tool: str = "iptables", table: str = "nat") -> list[list[str]]:
    """The rule specs of a chain, of the nat table unless told ([] if the chain does not exist)."""
    result = run([tool, "-w", "5", "-t", table, "-S", chain], check=False)
    if result.returncode != 0:
        return []
    return [split_rule(line)[2:] for line in result.stdout.splitlines() if line.startswith(f"-A {chain} ")]


# ------------------------------------------------------------------------------------------ processes


class Process:
    """A child process with its own log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], logs: Path, env: dict | None = None):
        self.name = name
        self.log_path = logs / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n=== {' '.join(argv)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill looks like."""
        if self.alive():
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, grace: float = 10) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def http(method: str, url: str, body: dict | None = None, timeout: float = 5) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class Kube:
    """The kube API double (cargo example `doubles`) and its REST API for pods and service accounts."""

    def __init__(self, logs: Path):
        self.kubeconfig = logs / "kubeconfig"
        ready = logs / "doubles.ready"
        ready.unlink(missing_ok=True)
        self.process = Process("doubles", [
            str(DOUBLES_BIN),
            "--kube-listen", "127.0.0.1:0",
            "--sts-listen", "127.0.0.1:0",
            "--kubeconfig-out", str(self.kubeconfig),
            "--ready-file", str(ready),
            "--trust-all",
        ], logs)
        wait_for("the kube API double", lambda: ready.exists() or self.process.check_alive(), timeout=30)
        # The ready file is written atomically once both doubles listen: {"kube": url, "sts": url, ...}.
        self.url = json.loads(ready.read_text())["kube"].rstrip("/")

    def _call(self, method: str, path: str, body: dict | None = None, ok=(200, 201, 202)) -> dict:
        status, text = http(method, self.url + path, body)
        if status not in ok:
            raise RuntimeError(f"{method} {path}: {status} {text}")
        return json.loads(text) if text else {}

    def create_service_account(self, ns: str, name: str, role_arn: str | None = None) -> None:
        annotations = {"eks.amazonaws.com/role-arn": role_arn} if role_arn else {}
        self._call("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations},
        })

    def create_node(self, name: str, labels: dict[str, str]) -> None:
        self._call("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}, "spec": {},
        })

    def create_pod(self, ns: str, name: str, ip: str, service_account: str = "default",
                   role: str | None = None, host_network: bool = False) -> dict:
        annotations = {"iam.amazonaws.com/role": role} if role else {}
        spec = {"nodeName": NODE, "serviceAccountName": service_account,
                "containers": [{"name": "app", "image": "app"}]}
        if host_network:
            spec["hostNetwork"] = True
        return self._call("POST", f"/api/v1/namespaces/{ns}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations},
            "spec": spec,
            # As the kubelet reports a started pod: the container's start is the pod's Running time.
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "containerStatuses": [{
                "name": "app", "image": "app", "imageID": "", "ready": True, "restartCount": 0,
                "state": {"running": {"startedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}},
            }]},
        })

    def delete_pod(self, ns: str, name: str) -> None:
        self._call("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}")

    def token(self, pod: dict, audience: str, seconds: int = 3600) -> str:
        """A token bound to `pod` (as created), minted through the TokenRequest API as the kubelet does
        for a projected service-account token volume."""
        meta, spec = pod["metadata"], pod["spec"]
        answer = self._call("POST", f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/"
                                    f"{spec.get('serviceAccountName', 'default')}/token", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [audience], "expirationSeconds": seconds,
                     "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"],
                                        "uid": meta["uid"]}},
        })
        return answer["status"]["token"]

    def stop(self) -> None:
        self.process.stop()


class Moto:
    """moto's server as the STS endpoint, on the node's dummy address so pods can reach it."""

    def __init__(self, host: str, logs: Path):
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.process = Process("moto", [str(VENV / "bin" / "moto_server"), "-H", host, "-p", str(self.port)],
                               logs)
        wait_for("moto", lambda: self.process.check_alive() or http("GET", self.url + "/moto-api/")[0] == 200,
                 timeout=30)

    def stop(self) -> None:
        self.process.stop()


class Agent:
    """The imds-broker binary with `--iptables`, in the root namespace."""

    def __init__(self, net: Net, kube: Kube, sts_url: str, logs: Path, extra: list[str] | None = None):
        self.net = net
        self.kube = kube
        self.sts_url = sts_url
        self.logs = logs
        self.port = free_port(net.node_ip)
        self.metrics_port = free_port()
        self.process: Process | None = None
        self.start(extra or [])

    def start(self, extra: list[str], wait: bool = True) -> None:
        self.extra = extra
        env = {**os.environ, "KUBECONFIG": str(self.kube.kubeconfig)}
        self.process = Process("agent", [
            str(IMDS_BROKER_BIN),
            "--node-name", NODE,
            # A test naming its own region (`--region ""`: the Node's label) gets it instead.
            *([] if "--region" in extra else ["--region", REGION]),
            "--sts-endpoint", self.sts_url,
            "--listen", f"{self.net.node_ip}:{self.port}", "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            "--base-role-arn", BASE_ROLE_ARN, "--pod-wait", "2s",
            "--iptables", "--host-interface", self.net.host_if_pattern, "--node-ip", f"{self.net.node_ip},{self.net.node_ip6}",
            # A test asking for another interval gets it instead (clap takes each flag once).
            *([] if "--iptables-reconcile-interval" in extra else ["--iptables-reconcile-interval", "1s"]),
            "--log", "info,imds_broker=debug",
            *extra,
        ], self.logs, env=env)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        def ready():
            self.process.check_alive()
            return http("GET", f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2)[0] == 200
        wait_for("agent readiness", ready, timeout=timeout)

    def restart(self, extra: list[str] | None = None) -> None:
        self.stop()
        self.start(self.extra if extra is None else extra)

    def kill(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Parsed /metrics: {(name, sorted label pairs): value}."""
        status, text = http("GET", f"http://127.0.0.1:{self.metrics_port}/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        samples = {}
        for line in text.splitlines():
            match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$", line)
            if not match:
                continue
            labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or "")))
            samples[(match.group(1), labels)] = float(match.group(3))
        return samples


def metric_sum(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all((k, val) in ls for k, val in labels.items()))


# ----------------------------------------------------------------------------------------------- SDKs


@dataclass
class Sdk:
    name: str
    imds_support: str  # what the SDK can speak: "v1 only", "v2 (falls back to v1)", "v2 only"
    argv: list[str]
    env: dict = field(default_factory=dict)

    @property
    def v1_only(self) -> bool:
        return self.imds_support == "v1 only"


def sdks() -> list[Sdk]:
    """The SDKs of the matrix, each as a command run inside a pod namespace."""
    probe = str(ROOT / "tests" / "e2e" / "py_probe.py")
    return [
        Sdk("boto3/botocore (current)", "v2, falls back to v1", [str(VENV / "bin" / "python"), probe]),
        Sdk("botocore 1.13.22 (pre-IMDSv2)", "v1 only",
            [str(VENV_LEGACY / "bin" / "python"), "-W", "ignore", probe]),
        Sdk("AWS CLI v1 (current)", "v2, falls back to v1", [str(VENV_CLI / "bin" / "aws"), "sts",
                                                             "get-caller-identity", "--output", "json"]),
        Sdk("AWS CLI 1.16.286 (pre-IMDSv2)", "v1 only", [str(VENV_LEGACY / "bin" / "aws"), "sts",
                                                        "get-caller-identity", "--output", "json"],
            env={"PYTHONWARNINGS": "ignore"}),
        Sdk("JS v3 fromInstanceMetadata", "v2, falls back to v1", ["node", str(JS_DIR / "probe.mjs")]),
        Sdk("Rust aws-config default chain", "v2 only", [str(RUST_PROBE_BIN)]),
    ]


def sdk_versions() -> dict[str, str]:
    """What is actually installed, read from the environments themselves."""
    def py(venv: Path, code: str) -> str:
        return run([str(venv / "bin" / "python"), "-W", "ignore", "-c", code], check=False).stdout.strip() or "?"

    def cli(venv: Path) -> str:
        out = run([str(venv / "bin" / "aws"), "--version"], check=False, env={**os.environ,
                                                                             "PYTHONWARNINGS": "ignore"})
        text = (out.stdout + out.stderr).strip()
        match = re.search(r"aws-cli/(\S+).*botocore/(\S+)", text)
        return f"awscli {match.group(1)}, botocore {match.group(2)}" if match else text or "?"

    js = "?"
    with contextlib.suppress(OSError, ValueError):
        js = json.loads((JS_DIR / "node_modules" / "@aws-sdk" / "credential-providers" / "package.json")
                        .read_text())["version"]
    rust = "?"
    with contextlib.suppress(OSError):
        lock = (ROOT / "Cargo.lock").read_text()
        match = re.search(r'name = "aws-config"\nversion = "([^"]+)"', lock)
        rust = match.group(1) if match else "?"
    return {
        "boto3/botocore (current)": py(VENV, "import boto3,botocore;print(f'boto3 {boto3.__version__}, "
                                             "botocore {botocore.__version__}')"),
        "botocore 1.13.22 (pre-IMDSv2)": py(VENV_LEGACY, "import botocore;print(f'botocore {botocore.__version__}')"),
        "AWS CLI v1 (current)": cli(VENV_CLI),
        "AWS CLI 1.16.286 (pre-IMDSv2)": cli(VENV_LEGACY),
        "JS v3 fromInstanceMetadata": f"@aws-sdk/credential-providers {js}",
        "Rust aws-config default chain": f"aws-config {rust}",
    }


@dataclass
class Outcome:
    """What one SDK run inside one pod produced, with the agent's own evidence of the IMDS version."""

    sdk: str
    pod: str
    ok: bool
    arn: str | None
    no_credentials: bool
    error: str | None
    imds: str
    raw: str

    @property
    def role(self) -> str | None:
        if not self.arn:
            return None
        match = re.match(r"arn:aws:sts::\d+:assumed-role/([^/]+)/", self.arn)
        return match.group(1) if match else self.arn


def probe_env(sts_url: str, home: Path) -> dict:
    """A clean environment: no credentials, no profiles, no IMDS override; only STS's endpoint is set."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL_STS": sts_url,
        "LANG": "C.UTF-8",
    }
    return env


CONTAINER_REQUESTS = "imds_broker_container_credentials_requests_total"


def run_sdk(sdk: Sdk, pod: PodNet, agent: Agent, sts_url: str, home: Path, timeout: float = 60,
            env: dict | None = None) -> Outcome:
    """Runs `sdk` inside `pod` (with `env` added); which endpoint served it, and the IMDS version, are
    read from the agent's request counters around the run."""
    argv = list(sdk.argv)
    if "sts" in argv and "get-caller-identity" in argv:
        argv += ["--endpoint-url", sts_url]
    before = agent.metrics()
    result = pod.exec(argv, env={**probe_env(sts_url, home), **sdk.env, **(env or {})}, timeout=timeout)
    after = agent.metrics()

    def delta(name="imds_broker_imds_requests_total", **labels):
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    tokens = delta(route="token", code="200")
    documents = delta(route="credentials", code="200")
    refused_v1 = delta(code="401")
    imds_requests = delta()
    served = delta(CONTAINER_REQUESTS, code="200")
    refused = delta(CONTAINER_REQUESTS) - served
    if served or refused:
        # The container-credentials endpoint answered; any IMDS request besides is shown too.
        imds = "container 200" if served else "container refused"
        if imds_requests:
            imds += f" + {int(imds_requests)} IMDS requests"
    elif documents and tokens:
        imds = "IMDSv2"
    elif documents:
        imds = "IMDSv1"
    elif refused_v1 and not tokens:
        imds = "v1 refused (401)"
    elif tokens:
        imds = "IMDSv2 (no document)"
    else:
        imds = "-"
    text = (result.stdout + result.stderr).strip()
    arn = error = None
    no_credentials = False
    doc = {}
    out = result.stdout.strip()
    # The CLI prints indented JSON, the probes one line after whatever the SDK logged.
    for candidate in (out, out.splitlines()[-1] if out else ""):
        with contextlib.suppress(json.JSONDecodeError):
            doc = json.loads(candidate)
            break
    if result.returncode == 0:
        arn = doc.get("arn") or doc.get("Arn")
    else:
        error = doc.get("error") or result.stderr.strip().splitlines()[-1:] and result.stderr.strip().splitlines()[-1]
        no_credentials = bool(doc.get("no_credentials")) or "Unable to locate credentials" in text
    return Outcome(sdk.name, pod.ns, result.returncode == 0 and bool(arn), arn, no_credentials, error or None,
                   imds, text[-2000:])


@dataclass
class Row:
    scenario: str
    sdk: str
    version: str
    imds: str
    role: str
    expected: str
    passed: bool


MATRIX: list[Row] = []


def record(scenario: str, outcome: Outcome, expected: str, passed: bool, versions: dict[str, str]) -> Row:
    row = Row(scenario, outcome.sdk, versions.get(outcome.sdk, "?"), outcome.imds,
              outcome.role or ("none (no credentials)" if outcome.no_credentials else f"none: {outcome.error}"),
              expected, passed)
    MATRIX.append(row)
    return row


def format_matrix(rows: list[Row]) -> str:
    headers = ("scenario", "SDK", "version", "IMDS used", "role obtained", "expected", "result")
    table = [headers] + [(r.scenario, r.sdk, r.version, r.imds, r.role[:60], r.expected,
                          "PASS" if r.passed else "FAIL") for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(headers))]
    lines = []
    for i, row in enumerate(table):
        lines.append("  ".join(str(cell).ljust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- node


class Node:
    """Everything at once, as a context manager that always tears down."""

    def __init__(self, prefix: str = "imdsb", octet: int = 0, agent_flags: list[str] | None = None):
        self.net = Net(prefix, octet)
        self.topology = Topology(self.net)
        self.logs = TARGET / f"{prefix}-logs"
        self.agent_flags = agent_flags or []
        self.kube: Kube | None = None
        self.moto: Moto | None = None
        self.agent: Agent | None = None
        self.home = Path(tempfile.mkdtemp(prefix=f"{prefix}-home-"))

    def __enter__(self) -> Node:
        for binary in (IMDS_BROKER_BIN, DOUBLES_BIN):
            if not binary.exists():
                raise RuntimeError(f"{binary} is missing: run `cargo build --bins --examples` first")
        if os.geteuid() != 0:
            raise RuntimeError("network namespaces and iptables need root")
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True)
        try:
            self.topology.setup()
            self.kube = Kube(self.logs)
            self.moto = Moto(self.net.node_ip, self.logs)
            self.agent = Agent(self.net, self.kube, self.moto.url, self.logs, self.agent_flags)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for part in (self.agent, self.moto, self.kube):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()
        self.topology.teardown()
        shutil.rmtree(self.home, ignore_errors=True)

    def add_pod(self, n: int, name: str, ns: str = "default", service_account: str = "default",
                role: str | None = None) -> PodNet:
        """A pod: its network namespace, then its object in the kube API."""
        pod = self.topology.add_pod(n)
        self.kube.create_pod(ns, name, pod.ip, service_account, role)
        return pod

    def run_sdk(self, sdk: Sdk, pod: PodNet, env: dict | None = None) -> Outcome:
        return run_sdk(sdk, pod, self.agent, self.moto.url, self.home, env=env)


class HostNet:
    """The node's own network namespace, as a `hostNetwork` pod sees it: commands run unwrapped."""

    ns = "host network"

    def exec(self, argv: list[str], *, env: dict | None = None, timeout: float = 60,
             check: bool = False) -> subprocess.CompletedProcess:
        return run(argv, env=env, timeout=timeout, check=check)


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    clean = sub.add_parser("cleanup", help="remove namespaces, interfaces and rules left by a killed run")
    clean.add_argument("--prefix", default="imdsb")
    args = parser.parse_args()
    if args.command == "cleanup":
        cleanup(Net(args.prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
