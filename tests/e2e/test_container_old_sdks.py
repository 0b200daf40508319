"""End-to-end: SDKs too old for 169.254.170.23, with the container-credentials variables set.

A pod with a role (its service account's eks.amazonaws.com/role-arn) runs each SDK with
AWS_CONTAINER_CREDENTIALS_FULL_URI=http://169.254.170.23/v1/credentials and
AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE pointing at a file holding a token, as the injection policy
(deploy/components/pod-identity-injection) sets them:

- botocore 1.13.22, AWS SDK for Go v1 1.44.133 and v2 1.17.1 (Debian's) accept loopback hosts only
  (botocore also 169.254.170.2): they fail with their own error, without any request to the endpoint
  and without falling back to instance metadata (the agent counts no IMDS request);
- the JavaScript SDK v2 2.574.0 drops the container provider from its chain on such a host and falls
  back to instance metadata: it gets the pod's role through IMDS (the agent counts the document).

This is why injection is opt-in per workload (README, "Container credentials"). A positive control per
failing SDK: the same probe, the URI on a loopback credentials server inside the pod's namespace, gets
that server's credentials, so each failure above is the SDK's host rule, not a broken probe. (These
releases read AWS_CONTAINER_AUTHORIZATION_TOKEN, not the _FILE variable: the control sets both.)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import harness
from harness import BASE_ROLE_ARN, ROOT, TARGET

N = 30
NS = "team-old"
ROLE = "e2e-old-sdks-role"
URI = "http://169.254.170.23/v1/credentials"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.e2e-old-sdks.not-a-real-signature"
GO_V1 = TARGET / "go-v1-probe"
GO_V2 = TARGET / "go-v2-probe"
CONTAINER_COUNTER = "imds_broker_container_credentials_requests_total"
IMDS_COUNTER = "imds_broker_imds_requests_total"

BOTOCORE = "botocore 1.13.22 (pre-IMDSv2)"
SDKS = {
    BOTOCORE: harness.Sdk(BOTOCORE, "v1 only", [str(harness.VENV_LEGACY / "bin" / "python"), "-W", "ignore",
                                                  str(ROOT / "tests" / "e2e" / "py_probe.py")]),
    "Go v1 default chain": harness.Sdk("Go v1 default chain", "v2, falls back to v1", [str(GO_V1)]),
    "Go v2 default chain": harness.Sdk("Go v2 default chain", "v2, falls back to v1", [str(GO_V2)]),
    "JS v2 default chain": harness.Sdk("JS v2 default chain", "v1 only",
                                       ["node", str(harness.JS_DIR / "v2_probe.cjs")]),
}
# What each fails with, exactly (the probe's `error`); None: it falls back to IMDS and gets the role.
REFUSALS = {
    BOTOCORE: "ValueError: Unsupported host '169.254.170.23'.  Can only retrieve metadata from these hosts: "
              "169.254.170.2, localhost, 127.0.0.1",
    "Go v1 default chain": "NoCredentialProviders: no valid providers in chain\n"
                           "caused by: EnvAccessKeyNotFound: failed to find credentials in the environment.\n"
                           "SharedCredsLoad: failed to load profile, .\n"
                           "CredentialsEndpointError: invalid endpoint host, \"169.254.170.23\", only loopback "
                           "hosts are allowed.",
    "Go v2 default chain": "LoadDefaultConfig: invalid endpoint host, \"169.254.170.23\", only loopback hosts "
                           "are allowed",
    "JS v2 default chain": None,
}

# A credentials endpoint on the pod's own loopback, for the positive controls: answers every GET with one
# document and logs the path and Authorization header of each request as a JSON line.
CONTROL_SERVER = r"""
import http.server, json, sys
log = open(sys.argv[2], "a", buffering=1)
DOC = json.dumps({"AccessKeyId": "AKIAE2ECONTROL000001", "SecretAccessKey": "e2e-control-secret",
                  "Token": "e2e-control-session", "AccountId": "123456789012",
                  "Expiration": "2099-01-01T00:00:00Z"}).encode()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print(json.dumps({"path": self.path, "authorization": self.headers.get("Authorization")}), file=log)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(DOC)))
        self.end_headers()
        self.wfile.write(DOC)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print("listening", file=log)
server.serve_forever()
"""


def sdk_versions_of_old_sdks(versions: dict) -> dict[str, str]:
    """Read from what is installed: the Go sources the probes were built from, the JS package."""
    def find(path, pattern):
        try:
            match = re.search(pattern, path.read_text())
        except OSError:
            return "?"
        return match.group(1) if match else "?"

    gocode = Path("/usr/share/gocode/src/github.com/aws")
    v2 = find(gocode / "aws-sdk-go-v2/aws/go_module_metadata.go", r'goModuleVersion = "([^"]+)"')
    v2_config = find(gocode / "aws-sdk-go-v2/config/go_module_metadata.go", r'goModuleVersion = "([^"]+)"')
    js = find(harness.JS_DIR / "node_modules/aws-sdk/package.json", r'"version":\s*"([^"]+)"')
    return {
        BOTOCORE: versions.get(BOTOCORE, "?"),
        "Go v1 default chain": "aws-sdk-go " + find(gocode / "aws-sdk-go/aws/version.go", r'SDKVersion = "([^"]+)"'),
        "Go v2 default chain": f"aws-sdk-go-v2 {v2}, config {v2_config}",
        "JS v2 default chain": f"aws-sdk {js}",
    }


@pytest.fixture(scope="module")
def old(node, versions):
    for binary in (GO_V1, GO_V2):
        assert binary.exists(), f"{binary} is missing: tests/e2e/setup.sh builds it"
    # The endpoint is served and captured: these SDKs must still never reach it.
    node.agent.restart(["--container-credentials"])
    node.kube.create_service_account(NS, "default")
    node.kube.create_service_account(NS, "old-sdks", BASE_ROLE_ARN + ROLE)
    pod = node.add_pod(N, "app-old-sdks", NS, service_account="old-sdks")
    token_file = node.home / "eks-pod-identity-token"
    token_file.write_text(TOKEN)
    try:
        yield {"pod": pod, "token_file": token_file, "versions": {**versions, **sdk_versions_of_old_sdks(versions)}}
    finally:
        node.kube.delete_pod(NS, "app-old-sdks")
        node.topology.remove_pod(N)
        node.agent.restart([])


def run_with(node, old, sdk: harness.Sdk, env: dict):
    """run_sdk with extra variables; also the agent's container-credentials requests during the run."""
    with_env = harness.Sdk(sdk.name, sdk.imds_support, sdk.argv, {**sdk.env, **env})
    before = node.agent.metrics()
    outcome = node.run_sdk(with_env, old["pod"])
    after = node.agent.metrics()
    endpoint = harness.metric_sum(after, CONTAINER_COUNTER) - harness.metric_sum(before, CONTAINER_COUNTER)
    imds = harness.metric_sum(after, IMDS_COUNTER) - harness.metric_sum(before, IMDS_COUNTER)
    return outcome, endpoint, imds


@pytest.mark.parametrize("name", list(SDKS))
def test_an_old_sdk_with_the_variables_set_fails_or_falls_back_to_imds_as_known(node, old, name):
    sdk = SDKS[name]
    env = {"AWS_CONTAINER_CREDENTIALS_FULL_URI": URI, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(old["token_file"])}
    outcome, endpoint, imds = run_with(node, old, sdk, env)
    refusal = REFUSALS[name]
    if refusal is None:
        # Falls back: the role comes from an IMDS credentials document (v1: this release sends no token).
        expected = f"{ROLE} via IMDSv1 (fallback)"
        passed = (outcome.ok and outcome.arn.startswith(f"arn:aws:sts::{harness.ACCOUNT}:assumed-role/{ROLE}/")
                  and outcome.imds == "IMDSv1" and endpoint == 0)
    else:
        expected = "fails, no IMDS fallback"
        passed = (not outcome.ok and outcome.no_credentials and outcome.error == refusal and outcome.imds == "-"
                  and imds == 0 and endpoint == 0 and ROLE not in outcome.raw)
    harness.record("FULL_URI=169.254.170.23", outcome, expected, passed, old["versions"])
    assert passed, f"{name}: wanted {expected}; IMDS requests {imds}, endpoint requests {endpoint}: {outcome}"


@pytest.fixture
def control_server(old, node):
    """The loopback credentials server in the pod's namespace: (port, log path)."""
    port = 18080
    log = node.logs / "old-sdks-control.log"
    log.unlink(missing_ok=True)
    proc = subprocess.Popen(["ip", "netns", "exec", old["pod"].ns, sys.executable, "-c", CONTROL_SERVER, str(port),
                             str(log)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        harness.wait_for("the control server", lambda: log.exists() and "listening" in log.read_text(), timeout=10)
        yield port, log
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("name", [n for n, refusal in REFUSALS.items() if refusal is not None])
def test_control_the_same_probe_gets_credentials_from_a_loopback_endpoint(node, old, control_server, name):
    port, log = control_server
    env = {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"http://127.0.0.1:{port}/v1/credentials",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(old["token_file"]),
        "AWS_CONTAINER_AUTHORIZATION_TOKEN": TOKEN,
    }
    outcome, endpoint, imds = run_with(node, old, SDKS[name], env)
    requests = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    # moto names the caller of an access key it never issued after its default user.
    passed = (outcome.ok and outcome.arn == f"arn:aws:sts::{harness.ACCOUNT}:user/moto" and imds == 0
              and endpoint == 0 and requests
              and all(r == {"path": "/v1/credentials", "authorization": TOKEN} for r in requests))
    harness.record("control: FULL_URI=127.0.0.1", outcome, "the loopback endpoint's credentials", passed,
                   old["versions"])
    assert passed, f"{name}: requests {requests}, IMDS {imds}: {outcome}"
