"""The hop limit of IMDSv2 token responses (EC2's HttpPutResponseHopLimit), seen from network namespaces.

A container nested one routed hop behind a pod (docker-in-pod: a veth, forwarding and masquerade inside
the pod's namespace, so the agent sees the pod's own address) gets no token with the default limit of 1,
while the pod itself does, and IMDSv1 answers still reach the nested container. With `--token-hop-limit 2`
the nested container gets a token too. The TTL of the packets arriving in the pod is read with an
iptables `ttl` match in the pod's namespace.

Everything here lives in namespaces this test creates (named under the harness prefix, so the harness
cleanup removes them even after a crash).
"""

import json
import sys

import harness

N = 40
NESTED_NET = "10.198.40"
PUT = (
    "import json,urllib.request\n"
    "r=urllib.request.Request('http://169.254.169.254/latest/api/token',method='PUT',"
    "headers={'X-aws-ec2-metadata-token-ttl-seconds':'60'})\n"
    "try:\n"
    "    print(json.dumps(['token',len(urllib.request.urlopen(r,timeout=2).read())]))\n"
    "except OSError as e:\n"
    "    print(json.dumps(['failed',type(e).__name__]))\n"
)
GET_V1 = (
    "import json,urllib.request\n"
    "resp=urllib.request.urlopen('http://169.254.169.254/latest/meta-data/placement/region',timeout=3)\n"
    "print(json.dumps(['ok',resp.read().decode()]))\n"
)


def in_ns(ns: str, code: str) -> list:
    result = harness.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], timeout=20, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def add_nested(pod) -> str:
    """A namespace routed behind `pod`, masqueraded to the pod's address."""
    nested = f"{pod.ns}-nested"
    harness.run(["ip", "netns", "add", nested])
    harness.run(["ip", "netns", "exec", pod.ns, "ip", "link", "add", "ctr0", "type", "veth",
                 "peer", "name", "eth0", "netns", nested])
    for argv in (
        ["ip", "addr", "add", f"{NESTED_NET}.1/30", "dev", "ctr0"],
        ["ip", "link", "set", "ctr0", "up"],
        ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
        ["iptables", "-w", "5", "-t", "nat", "-A", "POSTROUTING", "-s", f"{NESTED_NET}.0/30", "-o", "eth0",
         "-j", "MASQUERADE"],
    ):
        harness.run(["ip", "netns", "exec", pod.ns, *argv])
    for argv in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "addr", "add", f"{NESTED_NET}.2/30", "dev", "eth0"],
        ["ip", "link", "set", "eth0", "up"],
        ["ip", "route", "add", "default", "via", f"{NESTED_NET}.1"],
    ):
        harness.run(["ip", "netns", "exec", nested, *argv])
    return nested


def ttl_one_packets(pod) -> int | None:
    """Packets from the metadata address that arrived in the pod's namespace with TTL 1 (None without the
    kernel's ttl match)."""
    listing = harness.run(["ip", "netns", "exec", pod.ns, "iptables", "-w", "5", "-t", "mangle", "-nvxL",
                           "PREROUTING"], check=False).stdout
    for line in listing.splitlines():
        if "TTL match TTL == 1" in line:
            return int(line.split()[0])
    return None


def test_a_container_nested_behind_a_pod_gets_no_token_unless_the_hop_limit_allows_it(node):
    node.agent.restart([])
    pod = node.add_pod(N, "hop-limit", "default")
    nested = add_nested(pod)
    harness.run(["ip", "netns", "exec", pod.ns, "iptables", "-w", "5", "-t", "mangle", "-A", "PREROUTING",
                 "-s", "169.254.169.254", "-m", "ttl", "--ttl-eq", "1"], check=False)
    try:
        before = ttl_one_packets(pod)
        assert in_ns(pod.ns, PUT) == ["token", 56], "the pod itself is one hop away"
        assert in_ns(nested, PUT)[0] == "failed", "a token must not survive a second hop"
        assert in_ns(nested, GET_V1) == ["ok", harness.REGION], "IMDSv1 answers are not limited"
        if before is not None:
            assert ttl_one_packets(pod) > before, "the token response arrives with TTL 1"

        node.agent.restart(["--token-hop-limit", "2"])
        assert in_ns(nested, PUT) == ["token", 56]
    finally:
        node.agent.restart([])
        harness.run(["ip", "netns", "del", nested], check=False)
        node.topology.remove_pod(N)
        node.kube.delete_pod("default", "hop-limit")
