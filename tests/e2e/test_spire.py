"""--identity-source spire, end to end: a pod in its own network namespace gets its role through a
JWT-SVID. The SPIRE agent double (the `doubles` example with --spire-socket) serves the Delegated
Identity API on a Unix socket and signs SVIDs with its own key; its STS double trusts only the SPIRE
OIDC discovery provider's keys and the pod's SPIFFE ID, so a service-account token would be refused."""

import json
import shutil
import tempfile
from pathlib import Path

import harness

N = 50
NS = "team-spire"
ROLE = "spire-reader"
SPIFFE_ID = f"spiffe://example.org/ns/{NS}/sa/default"


def test_a_pod_gets_its_role_through_a_jwt_svid_whose_sub_is_its_spiffe_id(node):
    home = Path(tempfile.mkdtemp(prefix="imdsb-spire-"))
    socket, ready = home / "admin.sock", home / "ready.json"
    doubles = harness.Process("spire-doubles", [
        str(harness.DOUBLES_BIN),
        "--spire-socket", str(socket),
        "--spire-entry", f"k8s:ns:{NS},k8s:sa:default={SPIFFE_ID}",
        "--trust", f"{harness.BASE_ROLE_ARN}{ROLE}={SPIFFE_ID}",
        "--ready-file", str(ready),
    ], node.logs)
    saved_sts = node.agent.sts_url
    try:
        harness.wait_for("the SPIRE double", lambda: ready.exists() or doubles.check_alive(), timeout=30)
        sts = json.loads(ready.read_text())["sts"].rstrip("/")
        node.agent.sts_url = sts
        node.agent.restart(["--identity-source", "spire", "--spire-admin-socket", str(socket)])
        pod = node.add_pod(N, "app-spire", NS, role=ROLE)
        status, body = pod.imds_get(f"/latest/meta-data/iam/security-credentials/{ROLE}")
        assert status == 200, body
        assert json.loads(body)["Code"] == "Success", body
        status, calls = harness.http("GET", f"{sts}/_double/calls")
        assert status == 200, calls
        issued = json.loads(calls)["issued"]
        assert [i["sub"] for i in issued] == [SPIFFE_ID], issued
    finally:
        node.agent.sts_url = saved_sts
        node.agent.restart([])
        doubles.stop()
        node.topology.remove_pod(N)
        node.kube.delete_pod(NS, "app-spire")
        shutil.rmtree(home, ignore_errors=True)
