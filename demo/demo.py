"""The imds-broker demo: one node in a box, three pods, legacy SDKs, who gets what. Run by demo/run.sh."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))

import harness  # noqa: E402
from harness import BASE_ROLE_ARN  # noqa: E402

PODS = [
    # (n, namespace, pod, service account, how the role is asked for)
    (1, "shop", "billing", "billing", "SA annotation eks.amazonaws.com/role-arn=" + BASE_ROLE_ARN + "billing-reader"),
    (2, "shop", "reports", "default", "pod annotation iam.amazonaws.com/role=reports-writer"),
    (3, "shop", "sandbox", "default", "no annotation at all"),
]


def say(text: str = "") -> None:
    print(text, flush=True)


def main() -> int:
    started = time.monotonic()
    with harness.Node(prefix="imdsd", octet=1) as node:
        say(f"\n== node: agent {node.net.node_ip}:{node.agent.port}, STS = moto at {node.moto.url}, "
            f"kube API double at {node.kube.url}")
        say("== iptables, installed by the agent itself (nat table):")
        for rule in harness.run(["iptables", "-w", "5", "-t", "nat", "-S"]).stdout.splitlines():
            if "IMDS-BROKER" in rule:
                say("   " + rule)

        kube = node.kube
        kube.create_service_account("shop", "default")
        kube.create_service_account("shop", "billing", BASE_ROLE_ARN + "billing-reader")
        pods = {}
        say("\n== pods (each a network namespace with a veth, like a CNI would make):")
        for n, ns, name, sa, how in PODS:
            pods[name] = node.add_pod(n, name, ns, service_account=sa,
                                      role="reports-writer" if name == "reports" else None)
            say(f"   {ns}/{name:<8} ip {pods[name].ip:<12} {how}")

        sdks = {s.name: s for s in harness.sdks()}
        chosen = [sdks["AWS CLI 1.16.286 (pre-IMDSv2)"], sdks["boto3/botocore (current)"]]
        versions = harness.sdk_versions()
        say("\n== inside each pod: `aws sts get-caller-identity` with NO endpoint override for IMDS;")
        say("   the SDK dials http://169.254.169.254 as on EC2 and calls STS (moto) with what it got.\n")
        rows = []
        for _, ns, name, _, how in PODS:
            for sdk in chosen:
                outcome = node.run_sdk(sdk, pods[name])
                got = outcome.arn or ("NOTHING: no credentials" if outcome.no_credentials
                                      else f"error: {outcome.error}")
                rows.append((f"{ns}/{name}", f"{sdk.name} [{versions.get(sdk.name, '?')}]", outcome.imds, got))
        widths = [max(len(r[i]) for r in rows + [("pod", "SDK", "IMDS", "identity")]) for i in range(4)]
        for row in [("pod", "SDK", "IMDS", "identity")] + rows:
            say("   " + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())

        sandbox = [r for r in rows if r[0] == "shop/sandbox"]
        ok = all(r[3].startswith("NOTHING") for r in sandbox)
        ok &= all("assumed-role/billing-reader/" in r[3] for r in rows if r[0] == "shop/billing")
        ok &= all("assumed-role/reports-writer/" in r[3] for r in rows if r[0] == "shop/reports")
        status, body = pods["sandbox"].imds_get("/latest/meta-data/iam/security-credentials/")
        say(f"\n== shop/sandbox asks IMDS for its role name: HTTP {status} (no role, nothing leaked)")

        say("\n== the agent is killed: pods fail closed instead of reaching the node's own IMDS")
        node.agent.kill()
        say(f"   connect 169.254.169.254:80 from shop/billing: {pods['billing'].dial('169.254.169.254', 80)}")
        node.agent.start(node.agent.extra)
        outcome = node.run_sdk(chosen[0], pods["billing"])
        say(f"   agent back: shop/billing gets {outcome.arn}")
        ok &= bool(outcome.ok)

        say(f"\n== {'OK' if ok else 'UNEXPECTED RESULT'}: every pod got exactly its own role, the role-less pod "
            f"got nothing ({time.monotonic() - started:.0f}s). Cleaning up.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
