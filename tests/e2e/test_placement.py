"""On-prem placement from the Node's labels alone: an agent started without --region or
--availability-zone reads its Node's topology.kubernetes.io/region and topology.kubernetes.io/zone
labels, and three real SDKs, run in a pod's network namespace without AWS_REGION, find the region
through 169.254.169.254: botocore's IMDSRegionProvider (from placement/availability-zone/), the JS v3
SDK's MetadataService (placement/region) and aws-config's default region chain (placement/region).
"""

import json

import harness

N = 45
REGION = "ap-southeast-2"
ZONE = "ap-southeast-2b"

BOTOCORE = (
    "import json,botocore.session\n"
    "from botocore.utils import IMDSRegionProvider\n"
    "print(json.dumps({'region': IMDSRegionProvider(botocore.session.get_session()).provide()}))\n"
)


def region_of(pod, argv: list[str], home) -> dict:
    """What the probe printed: {"region": ...} or {"error": ...}."""
    env = harness.probe_env("http://127.0.0.1:9", home)
    for key in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        env.pop(key)
    result = pod.exec(argv, env=env, timeout=60)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"{argv[0]}: rc {result.returncode}\n{result.stdout}\n{result.stderr}"
    return json.loads(lines[-1])


def test_sdks_find_the_region_from_the_nodes_labels_alone(node):
    node.kube.create_node(harness.NODE, {
        "topology.kubernetes.io/region": REGION,
        "topology.kubernetes.io/zone": ZONE,
    })
    node.agent.restart(["--region", "", "--upstream-imds", "none"])
    try:
        pod = node.add_pod(N, "placement", "default")
        status, zone = pod.imds_get("/latest/meta-data/placement/availability-zone/")
        assert (status, zone) == (200, ZONE)
        found = {
            "botocore": region_of(pod, [str(harness.VENV / "bin" / "python"), "-c", BOTOCORE], node.home),
            "js-v3": region_of(pod, ["node", str(harness.JS_DIR / "region.mjs")], node.home),
            "rust": region_of(pod, [str(harness.RUST_PROBE_BIN), "region"], node.home),
        }
        assert {sdk: printed.get("region") for sdk, printed in found.items()} == dict.fromkeys(found, REGION), found
        status, document = pod.imds_get("/latest/dynamic/instance-identity/document")
        assert status == 200
        document = json.loads(document)
        assert (document["region"], document["availabilityZone"], document["synthetic"]) == (REGION, ZONE, "true")
    finally:
        node.kube._call("DELETE", f"/api/v1/nodes/{harness.NODE}")
        node.agent.restart([])
