"""End-to-end: the capture never opens, not even while the agent repairs it, and the agent's IMDS port
answers pod interfaces only.

The decoy. 169.254.169.254/32 is put on the node's dummy interface and a tiny TCP server (`DECOY`) listens
on 169.254.169.254:80 in the root namespace, recording the peer of every connection it accepts: it is the
"node's real IMDS" a pod reaches whenever its SYN passes PREROUTING without being DNATed to the agent.
An outsider namespace, whose host-side interface --host-interface does not match, first proves that the
decoy is reachable when nothing captures.

The tampering. A prober in a pod namespace requests /latest/meta-data/iam/security-credentials/ without
pause (several threads) while the test forces 100 repairs with a 200 ms reconcile interval, cycling
through four kinds of damage. Each of them leaves 169.254.169.254 captured at every instant, so any
connection reaching the decoy can only come through a window the agent's own repair opened:

- displaced: a foreign (non-matching) rule is inserted above the agent's jump; the jump still captures;
- duplicated: a second copy of the agent's jump is appended to PREROUTING; the first still captures;
- chain rewritten: the agent's chain is flushed and refilled in one transaction of the test's own with a
  DNAT to the agent that differs from the agent's rule only in its comment;
- jump deleted: in one transaction of the test's own, a stand-in DNAT to the agent is inserted first in
  PREROUTING and the agent's jump deleted; the stand-in is removed once the agent's jump is back on top.

Foreign rules and stand-ins are removed only after the repair, when the agent's jump is first again, so
their removal never uncovers anything either. The old repairs (delete-then-insert, flush-then-append)
open a window of their own in the first three kinds, which the prober's continuous connections fall into.

The test asserts that no connection from the prober reached the decoy, that the prober got answers from
the agent throughout, that the agent counted at least 100 repairs, and that the repairs flushed the
conntrack entry of the outsider's (un-DNATed) connection to the decoy while keeping the prober's.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import harness

PROBER_N = 7
OUTSIDER_N = 90
ROUNDS = 100
IMDS = "169.254.169.254"
REPAIRS = "imds_broker_iptables_repairs_total"
FOREIGN_COMMENT = "imdsb e2e: a foreign rule"
STAND_IN_COMMENT = "imdsb e2e: stand-in capture"

DECOY = r"""
import socket, sys, threading, time
log = open(sys.argv[1], "a", buffering=1)
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("169.254.169.254", 80))
server.listen(256)
print("listening", file=log)
def answer(conn, peer):
    print(peer[0], peer[1], f"{time.time():.3f}", file=log)
    try:
        conn.settimeout(1)
        conn.recv(4096)
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\ndecoy")
    except OSError:
        pass
    finally:
        conn.close()
while True:
    conn, peer = server.accept()
    threading.Thread(target=answer, args=(conn, peer), daemon=True).start()
"""

PROBER = r"""
import json, os, socket, sys, threading, time
stop, threads = sys.argv[1], 4
counts = {"agent": 0, "decoy": 0, "failed": 0}
lock = threading.Lock()
def probe():
    while not os.path.exists(stop):
        kind = "failed"
        try:
            with socket.create_connection(("169.254.169.254", 80), timeout=1) as s:
                s.sendall(b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.0\r\nHost: 169.254.169.254\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            if data.endswith(b"decoy"):
                kind = "decoy"
            elif data.startswith(b"HTTP/1."):
                kind = "agent"
        except OSError:
            time.sleep(0.01)
        with lock:
            counts[kind] += 1
workers = [threading.Thread(target=probe) for _ in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
print(json.dumps(counts))
"""


def ipt(*args: str, tool: str = "iptables", table: str = "nat") -> None:
    harness.run([tool, "-w", "5", "-t", table, *args])


def restore(payload: str) -> None:
    """One transaction of the test's own: the capture is never absent while the test tampers."""
    harness.run(["iptables-restore", "-w", "5", "--noflush"], input=payload)


def quoted(spec: list[str]) -> str:
    return " ".join(f'"{a}"' if " " in a else a for a in spec)


def jumps(chain: str = "PREROUTING", table: str = "nat") -> list[list[str]]:
    return [r for r in harness.nat_listing(chain, table=table) if r[-2:] == ["-j", "IMDS-BROKER"]]


@pytest.fixture(scope="module")
def capture(node):
    node.kube.create_service_account("capture", "default")
    prober = node.add_pod(PROBER_N, "capture-prober", "capture")
    outsider = node.topology.add_outsider(OUTSIDER_N)
    yield {"prober": prober, "outsider": outsider}
    node.topology.remove_pod(PROBER_N)
    node.topology.remove_pod(OUTSIDER_N)
    node.kube.delete_pod("capture", "capture-prober")


@pytest.fixture
def decoy(node):
    """The node's real IMDS as the pods would meet it without the capture: (log path, peers())."""
    log_path = node.logs / "decoy-peers.log"  # not decoy.log: the Process writes that one
    log_path.unlink(missing_ok=True)
    harness.run(["ip", "addr", "add", f"{IMDS}/32", "dev", node.net.node_if])
    server = harness.Process("decoy", [sys.executable, "-c", DECOY, str(log_path)], node.logs)
    try:
        harness.wait_for("the decoy", lambda: server.check_alive() or (
            log_path.exists() and "listening" in log_path.read_text()), timeout=10)

        def peers() -> list[str]:
            return [line.split()[0] for line in log_path.read_text().splitlines() if line != "listening"]

        yield peers
    finally:
        server.stop(grace=2)
        harness.run(["ip", "addr", "del", f"{IMDS}/32", "dev", node.net.node_if], check=False)


def test_the_imds_port_drops_connections_that_do_not_come_from_a_pod_interface(node, capture):
    for tool, address in (("iptables", node.net.node_ip), ("ip6tables", node.net.node_ip6)):
        guard = harness.nat_listing("INPUT", tool=tool, table="filter")
        assert guard and guard[0][-2:] == ["-j", "IMDS-BROKER"], guard
        assert guard[0][:2] == ["-d", f"{address}/{128 if ':' in address else 32}"]
        assert f"--dport {node.agent.port}" in " ".join(guard[0])
    outsider, prober = capture["outsider"], capture["prober"]
    assert outsider.dial(node.net.node_ip, node.agent.port, timeout=1.5) == "timeout", "dropped, not refused"
    assert prober.dial(node.net.node_ip, node.agent.port) == "connected"
    # Only the IMDS port is guarded: the outsider reaches another port of the same address (moto).
    assert outsider.dial(node.net.node_ip, node.moto.port) == "connected"
    status, _ = harness.http("GET", f"http://127.0.0.1:{node.agent.metrics_port}/readyz")
    assert status == 200, "the admin port is not guarded"
    status, body = prober.imds_get("/latest/meta-data/iam/security-credentials/", token=True)
    assert status == 404 and "decoy" not in body, (status, body)


def test_forced_repairs_under_continuous_requests_never_let_a_connection_reach_the_node_imds(
        node, capture, decoy):
    prober, outsider = capture["prober"], capture["outsider"]
    assert outsider.dial(IMDS, 80) == "connected", "an uncaptured interface reaches the decoy"
    harness.wait_for("the outsider's connection to be recorded", lambda: outsider.ip in decoy(), timeout=5)
    assert prober.ip not in decoy()
    bypassed = ["conntrack", "-L", "-f", "ipv4", "-d", IMDS, "--reply-src", IMDS]
    assert outsider.ip in harness.run(bypassed, check=False).stdout, "the outsider's connection was not DNATed"

    node.agent.restart(["--iptables-reconcile-interval", "200ms"])
    try:
        chain = harness.nat_listing("IMDS-BROKER")
        assert len(chain) == 1
        dnat = chain[0]
        stand_in = [a if a != "imds-broker: to the node agent" else STAND_IN_COMMENT for a in dnat]
        rewritten = [a if a != "imds-broker: to the node agent" else f"{FOREIGN_COMMENT} (rewritten)" for a in dnat]
        foreign = ["-s", "10.199.0.250/32", "-m", "comment", "--comment", FOREIGN_COMMENT, "-j", "RETURN"]
        stop = node.logs / "prober.stop"
        stop.unlink(missing_ok=True)
        out = node.logs / "prober.out"
        with open(out, "w") as sink:
            proc = subprocess.Popen(["ip", "netns", "exec", prober.ns, sys.executable, "-c", PROBER, str(stop)],
                                    stdout=sink, stderr=subprocess.STDOUT)
        started = harness.metric_sum(node.agent.metrics(), REPAIRS)
        kinds = {"displaced": 0, "duplicated": 0, "chain rewritten": 0, "jump deleted": 0}
        try:
            time.sleep(0.5)  # the prober is under way before the first tampering
            for round_ in range(ROUNDS):
                kind = list(kinds)[round_ % len(kinds)]
                harness.log(f"round {round_} {kind} at {time.time():.3f}")
                before = harness.metric_sum(node.agent.metrics(), REPAIRS)
                jump = jumps()[0]
                if kind == "displaced":
                    ipt("-I", "PREROUTING", "1", *foreign)
                elif kind == "duplicated":
                    ipt("-A", "PREROUTING", *jump)
                elif kind == "chain rewritten":
                    restore(f"*nat\n:IMDS-BROKER - [0:0]\n-A IMDS-BROKER {quoted(rewritten)}\nCOMMIT\n")
                else:
                    restore(f"*nat\n-I PREROUTING 1 {quoted(stand_in)}\n"
                            f"-D PREROUTING {quoted(jump)}\nCOMMIT\n")
                harness.wait_for(f"the repair of round {round_} ({kind})", lambda: harness.metric_sum(
                    node.agent.metrics(), REPAIRS) > before, timeout=10, interval=0.02)
                harness.wait_for(f"the capture in place after round {round_}", lambda: (
                    (p := harness.nat_listing("PREROUTING")) and p[0][-2:] == ["-j", "IMDS-BROKER"]
                    and len(jumps()) == 1 and harness.nat_listing("IMDS-BROKER") == [dnat]), timeout=10,
                    interval=0.02)
                harness.log(f"round {round_} repaired at {time.time():.3f}")
                # Our leftovers sit below the agent's jump now: removing them uncovers nothing.
                if kind == "displaced":
                    ipt("-D", "PREROUTING", *foreign)
                elif kind == "jump deleted":
                    ipt("-D", "PREROUTING", *stand_in)
                kinds[kind] += 1
        finally:
            stop.touch()
            proc.wait(timeout=20)
        repairs = harness.metric_sum(node.agent.metrics(), REPAIRS) - started
        counts = json.loads(Path(out).read_text().strip().splitlines()[-1])
        leaked = [peer for peer in decoy() if peer == prober.ip]
        harness.log(f"decoy: {len(leaked)} connections from the prober ({len(decoy())} in all, the outsider's "
                    f"included); prober: {counts}; repairs counted: {repairs:.0f}; tamperings: {kinds}")
        assert not leaked and counts["decoy"] == 0, (
            f"{len(leaked)} connections reached the node's IMDS during the agent's repairs: {counts}")
        assert repairs >= ROUNDS, repairs
        assert outsider.ip not in harness.run(bypassed, check=False).stdout, (
            "a repair flushes the conntrack entries of connections that reached the address itself")
        assert counts["agent"] >= 10 * ROUNDS, f"the prober was not continuously answered: {counts}"
    finally:
        node.agent.restart([])
