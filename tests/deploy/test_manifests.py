"""What deploy/ renders: every overlay, the uninstall kustomization, and every component on top of an
overlay, rendered with kustomize and checked offline (checks.py): against the Kubernetes OpenAPI
schemas, against the binary's --help, and for the image tag of Cargo.toml. Then what holds the
pieces together: the policies name the DaemonSet's ServiceAccount, the uninstall matches the capture
container, each platform's settings, each component's effect.

What this cannot show: that an API server admits the objects (no cluster here; the schemas are the
API's, but defaulting, admission and CRD installation are not run), nor that the image has the tools.
"""

from __future__ import annotations

import os
import re
import subprocess

import kubernetes_validate
import pytest
import yaml

import checks
from render import DEPLOY, ROOT, cargo_version, help_text, helps, render, render_composed, render_dir

OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if p.is_dir())
COMPONENTS = sorted(p.name for p in (DEPLOY / "components").iterdir() if (p / "kustomization.yaml").exists())
CNI = {"cni-aws-vpc": "eni+", "cni-calico": "cali+", "cni-cilium": "lxc+", "cni-flannel": "veth+"}
# The oldest Kubernetes with ValidatingAdmissionPolicy v1 (GA), and the newest the validator bundles.
KUBERNETES_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
# Kinds some components add that need a newer Kubernetes than the oldest above: the component, the
# first version with them, and the kinds.
NEWER_KINDS = {
    "pod-identity-injection": ("1.34", {"MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding"}),
}
# The uninstall pod idles in the kubelet's usual sandbox image.
PAUSE = frozenset({"registry.k8s.io/pause:3.10"})
AGENT_SA = "imds-broker"


def test_the_platforms_and_components_are_there():
    assert OVERLAYS == ["ec2", "eks", "on-prem"]
    for name in [*CNI, "monitoring", "spire", "startup-taint", "token-key", "container-credentials",
                 "pod-identity-injection", "pod-identity-workload"]:
        assert name in COMPONENTS, f"deploy/components/{name} is missing"
    for name in COMPONENTS:
        kind = yaml.safe_load((DEPLOY / "components" / name / "kustomization.yaml").read_text())["kind"]
        assert kind == "Component", f"deploy/components/{name} is a {kind}, not a Component"


# --- rendering targets -------------------------------------------------------------------------------


def targets():
    """(id, render function) for every overlay, the uninstall, and each component on the eks overlay."""
    out = [(f"overlays/{o}", lambda o=o: render_dir(f"overlays/{o}")) for o in OVERLAYS]
    out.append(("uninstall", lambda: render_dir("uninstall")))
    for c in COMPONENTS:
        out.append((f"overlays/eks+{c}", lambda c=c: render_composed(("overlays/eks",), (f"components/{c}",))))
    return out


TARGETS = dict(targets())


@pytest.fixture(params=sorted(TARGETS))
def rendered(request):
    return request.param, list(TARGETS[request.param]())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendering_is_valid_against_the_kubernetes_schemas(rendered, version):
    target, docs = rendered
    component = target.partition("+")[2]
    if component in NEWER_KINDS and minor(version) < minor(NEWER_KINDS[component][0]):
        # Older API servers do not know these kinds: the schemas say so, and the rest is checked.
        kinds = NEWER_KINDS[component][1]
        newer = [d for d in docs if d["kind"] in kinds]
        assert {d["kind"] for d in newer} == kinds, target
        problems = checks.schema_problems(newer, version)
        assert len(problems) == len(newer) and all(": no schema: " in p for p in problems), problems
        docs = [d for d in docs if d["kind"] not in kinds]
    assert checks.schema_problems(docs, version) == [], target


def minor(version: str) -> tuple[int, int]:
    major, minor_, *_ = version.split(".")
    return int(major), int(minor_)


@pytest.mark.parametrize("component", sorted(NEWER_KINDS))
def test_components_of_newer_kinds_are_valid_from_their_first_version(component):
    docs = list(render_composed(("overlays/eks",), (f"components/{component}",)))
    assert checks.schema_problems(docs, NEWER_KINDS[component][0]) == []


def test_every_flag_and_environment_variable_exists_in_the_binarys_help(rendered):
    target, docs = rendered
    assert checks.cli_problems(docs, helps()) == [], target


def test_every_image_is_the_cargo_version(rendered):
    target, docs = rendered
    assert checks.image_problems(docs, cargo_version(), others=PAUSE) == [], target


def test_the_image_the_build_tags_is_the_one_the_manifests_name():
    # podman keeps a locally built image under localhost/; a node pulls the overlay's images: name.
    built = subprocess.run([str(ROOT / "deploy/image/build.sh"), "--image-name"], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert built == f"localhost/{checks.IMAGE_NAME}:{cargo_version()}", built
    base = yaml.safe_load((DEPLOY / "base/kustomization.yaml").read_text())
    assert base["images"] == [{"name": checks.IMAGE_NAME, "newTag": cargo_version()}], base["images"]


def test_the_agents_images_are_only_ours():
    for overlay in OVERLAYS:
        assert checks.image_problems(list(render_dir(f"overlays/{overlay}")), cargo_version()) == [], overlay


# --- the agent's pieces fit together -----------------------------------------------------------------


def daemonset(docs):
    return checks.only_daemonset(docs)


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env") or []}


def server_and_capture(docs):
    spec = checks.pod_spec(daemonset(docs))
    return checks.container(spec, "containers", "server"), checks.container(spec, "containers", "capture")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_both_policies_match_the_daemonsets_service_account(overlay):
    docs = list(render_dir(f"overlays/{overlay}"))
    ds = daemonset(docs)
    sa = checks.pod_spec(ds)["serviceAccountName"]
    assert sa == AGENT_SA
    assert any(d["kind"] == "ServiceAccount" and d["metadata"]["name"] == sa for d in docs)
    username = f"system:serviceaccount:{ds['metadata']['namespace']}:{sa}"
    policies = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
    assert [p["metadata"]["name"] for p in policies] == ["imds-broker-token-request"]
    for policy in policies:
        conditions = [c["expression"] for c in policy["spec"]["matchConditions"]]
        assert conditions == [f"request.userInfo.username == '{username}'"], policy["metadata"]["name"]
    bindings = {d["spec"]["policyName"] for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"}
    assert bindings == {p["metadata"]["name"] for p in policies}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_agent_may_emit_events_and_its_cluster_role_is_bound_to_it(overlay):
    docs = list(render_dir(f"overlays/{overlay}"))
    role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "imds-broker")
    rules = role["rules"]
    events = [r for r in rules if r["apiGroups"] == ["events.k8s.io"] and "events" in r["resources"]]
    assert events and set(events[0]["verbs"]) == {"create", "patch"}, rules
    binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding" and d["metadata"]["name"] == "imds-broker")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": AGENT_SA, "namespace": "imds-broker"}]
    # Nothing cluster-wide it could write to but events and tokens.
    writes = {(tuple(r["apiGroups"]), tuple(r["resources"])) for r in rules if set(r["verbs"]) - {"get", "list", "watch"}}
    assert writes == {(("",), ("serviceaccounts/token",)), (("events.k8s.io",), ("events",))}, writes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_platform_sets_a_region_or_reads_the_nodes_labels_and_a_cni(overlay):
    docs = list(render_dir(f"overlays/{overlay}"))
    server, capture = server_and_capture(docs)
    region = env_of(server).get("AWS_REGION")
    if overlay == "on-prem":
        # The Node's topology.kubernetes.io/region label: the agent needs to read its own Node.
        assert region is None, env_of(server)
        role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "imds-broker")
        reads = [set(r["verbs"]) for r in role["rules"] if r["apiGroups"] == [""] and "nodes" in r["resources"]]
        assert reads and {"get", "list", "watch"} <= reads[0], role["rules"]
    else:
        assert re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", region or ""), env_of(server)
    assert env_of(capture).get("IMDS_BROKER_HOST_INTERFACE") in CNI.values(), env_of(capture)


def test_eks_and_ec2_proxy_the_nodes_imds_and_on_prem_answers_region_and_zone_itself():
    for overlay in ("eks", "ec2"):
        server, _ = server_and_capture(list(render_dir(f"overlays/{overlay}")))
        assert env_of(server).get("IMDS_BROKER_UPSTREAM_IMDS") == "auto", overlay
        assert "IMDS_BROKER_AVAILABILITY_ZONE" not in env_of(server), overlay
    server, _ = server_and_capture(list(render_dir("overlays/on-prem")))
    env = env_of(server)
    assert env["IMDS_BROKER_UPSTREAM_IMDS"] == "none"
    # Region and zone come from the Node's labels; no flag overrides them by default.
    assert "IMDS_BROKER_AVAILABILITY_ZONE" not in env and "AWS_REGION" not in env, env
    assert [e["name"] for e in server["env"]].count("IMDS_BROKER_UPSTREAM_IMDS") == 1


@pytest.mark.parametrize("component,pattern", sorted(CNI.items()))
def test_each_cni_component_sets_its_interface_pattern(component, pattern):
    docs = list(render_composed(("overlays/on-prem",), (f"components/{component}",)))
    server, capture = server_and_capture(docs)
    assert env_of(capture)["IMDS_BROKER_HOST_INTERFACE"] == pattern
    assert "IMDS_BROKER_HOST_INTERFACE" not in env_of(server), "the server does not manage iptables"


def test_an_overlays_patch_sets_the_patterns_of_chained_cnis_over_the_component():
    # What the cni-* components and the README tell users with chained CNIs to do.
    patch = yaml.safe_dump(
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "imds-broker", "namespace": "imds-broker"},
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {"name": "capture", "env": [{"name": "IMDS_BROKER_HOST_INTERFACE", "value": "eni+,lxc+"}]}
                        ]
                    }
                }
            },
        }
    )
    docs = list(render_composed(("base",), ("components/cni-aws-vpc",), (patch,)))
    _, capture = server_and_capture(docs)
    assert env_of(capture)["IMDS_BROKER_HOST_INTERFACE"] == "eni+,lxc+"
    assert [e["name"] for e in capture["env"]].count("IMDS_BROKER_HOST_INTERFACE") == 1


def test_the_daemonset_runs_critical_on_every_node_and_terminates_gracefully():
    ds = daemonset(list(render_dir("overlays/eks")))
    spec = checks.pod_spec(ds)
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["hostNetwork"] is True
    strategy = ds["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    # Two agents on one node would both bind the node's IMDS port: no surge.
    assert strategy["rollingUpdate"]["maxSurge"] == 0
    grace = re.search(r"--shutdown-grace <SHUTDOWN_GRACE>.*?\[default: (\d+)s\]", help_text(()), re.S)
    assert grace, "--shutdown-grace's default is not in seconds any more"
    assert spec["terminationGracePeriodSeconds"] > int(grace.group(1))
    server, _ = server_and_capture([ds])
    assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    ports = {p["name"] for p in server["ports"]}
    assert server["livenessProbe"]["httpGet"]["port"] in ports and server["readinessProbe"]["httpGet"]["port"] in ports


def bench_idle_rss_mib(pods: int) -> float:
    """The larger of the two idle readings (1 s after the last fetch, and settled after a heap trim) of
    the benchmark's trimming agent with `pods` pods."""
    table = (ROOT / "bench" / "RESULTS.md").read_text()
    row = re.search(rf"^\| {pods} \| yes \| \d+ \| \d+ \| ([\d.]+) MiB \| ([\d.]+) MiB \|", table, re.M)
    assert row, f"bench/RESULTS.md has no memory row for {pods} pods"
    return max(float(row.group(1)), float(row.group(2)))


def mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity).groups()
    return int(number) * units[unit]


def test_the_servers_memory_request_covers_the_benchmarks_idle_rss_at_1000_pods():
    server, capture = server_and_capture(list(render_dir("overlays/eks")))
    idle = bench_idle_rss_mib(1000)
    request, limit = mib(server["resources"]["requests"]["memory"]), mib(server["resources"]["limits"]["memory"])
    assert idle <= request < limit, (idle, request, limit)
    for c in (server, capture):
        assert "cpu" not in c["resources"].get("limits", {}), "a CPU limit throttles IMDS answers"


# --- components --------------------------------------------------------------------------------------


def test_the_token_key_component_mounts_the_secret_where_the_flag_points():
    docs = list(render_composed(("overlays/eks",), ("components/token-key",)))
    spec = checks.pod_spec(daemonset(docs))
    server = checks.container(spec, "containers", "server")
    path = env_of(server)["IMDS_BROKER_TOKEN_KEY_FILE"]
    mount = next(m for m in server["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    assert mount.get("readOnly") is True
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "imds-broker-token-key"
    assert path.rsplit("/", 1)[1] == "key", "the README's `kubectl create secret` names the key `key`"
    capture = checks.container(spec, "containers", "capture")
    assert all(m["name"] != mount["name"] for m in capture["volumeMounts"]), "the key is the server's alone"


def test_the_spire_component_selects_spire_and_mounts_the_admin_socket_where_the_flag_points():
    docs = list(render_composed(("overlays/on-prem",), ("components/spire",)))
    spec = checks.pod_spec(daemonset(docs))
    server = checks.container(spec, "containers", "server")
    env = env_of(server)
    assert env["IMDS_BROKER_IDENTITY_SOURCE"] == "spire"
    socket = env["IMDS_BROKER_SPIRE_ADMIN_SOCKET"]
    host = checks.mounted_host_paths(spec, server)
    directory = socket.rsplit("/", 1)[0]
    assert directory in host, f"{socket} is not under a hostPath mount: {host}"
    mount = next(m for m in server["volumeMounts"] if m["mountPath"] == directory)
    assert mount.get("readOnly") is True
    capture = checks.container(spec, "containers", "capture")
    assert all(m["name"] != mount["name"] for m in capture["volumeMounts"]), "the socket is the server's alone"


def test_the_startup_taint_component_sets_the_flag_the_policy_expects():
    docs = list(render_composed(("overlays/eks",), ("components/startup-taint",)))
    server, _ = server_and_capture(docs)
    policy = next(d for d in docs if d["kind"] == "ValidatingAdmissionPolicy" and "startup" in d["metadata"]["name"])
    variable = next(v for v in policy["spec"]["variables"] if v["name"] == "startupTaint")
    assert variable["expression"] == f"'{env_of(server)['IMDS_BROKER_STARTUP_TAINT']}'"
    role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "imds-broker-startup-taint")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "update"]}]


def test_the_pod_monitor_selects_the_agents_pods_and_its_metrics_port():
    docs = list(render_composed(("overlays/eks",), ("components/monitoring",)))
    ds = daemonset(docs)
    monitor = next(d for d in docs if d["kind"] == "PodMonitor")
    assert monitor["metadata"]["namespace"] == ds["metadata"]["namespace"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for c in checks.pod_spec(ds)["containers"] for p in c.get("ports", [])}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"metrics", "capture-metrics"} <= ports
    # The dashboard's and the alerts' `node` label comes from the pod's node.
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"} in endpoint["relabelings"]
    # The capture container serves its counters on the node's address, port 9182.
    capture = next(c for c in checks.pod_spec(ds)["containers"] if c["name"] == "capture")
    env = {v["name"]: v for v in capture["env"]}
    assert env["IMDS_BROKER_CAPTURE_METRICS_LISTEN"]["value"] == "$(CAPTURE_METRICS_IP):9182"
    assert env["CAPTURE_METRICS_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"


def test_without_the_monitoring_component_the_capture_container_opens_no_port():
    for overlay in OVERLAYS:
        capture = next(c for c in checks.pod_spec(daemonset(list(render_dir(f"overlays/{overlay}"))))["containers"] if c["name"] == "capture")
        assert not capture.get("ports") and "IMDS_BROKER_CAPTURE_METRICS_LISTEN" not in {v["name"] for v in capture["env"]}


def test_the_container_credentials_component_turns_the_endpoint_on_in_both_containers_and_nothing_else():
    plain = daemonset(list(render_dir("overlays/eks")))
    docs = list(render_composed(("overlays/eks",), ("components/container-credentials",)))
    ds = daemonset(docs)
    server, capture = server_and_capture([ds])
    for c in (server, capture):
        names = [e["name"] for e in c["env"]]
        assert names.count("IMDS_BROKER_CONTAINER_CREDENTIALS") == 1, c["name"]
        assert env_of(c)["IMDS_BROKER_CONTAINER_CREDENTIALS"] == "true", c["name"]
        assert "IMDS_BROKER_CONTAINER_CREDENTIALS_AUDIENCE" not in env_of(c), "the default audience is EKS's"
    # Take the variable out again and the DaemonSet is the overlay's.
    for c in checks.pod_spec(ds)["containers"]:
        c["env"] = [e for e in c["env"] if e["name"] != "IMDS_BROKER_CONTAINER_CREDENTIALS"]
    assert ds == plain
    added = [d for d in docs if d["kind"] != "DaemonSet" and d not in list(render_dir("overlays/eks"))]
    # Besides: the binding that lets the agent read the issuer and keys it verifies tokens against.
    assert [(d["kind"], d["roleRef"]["name"], d["subjects"]) for d in added] == [
        ("ClusterRoleBinding", "system:service-account-issuer-discovery",
         [{"kind": "ServiceAccount", "name": "imds-broker", "namespace": "imds-broker"}])]
    assert [d for d in docs if d["kind"] != "DaemonSet" and d not in added] == \
        [d for d in render_dir("overlays/eks") if d["kind"] != "DaemonSet"]


def test_the_container_credentials_flag_reaches_both_commands_help():
    # The server answers the endpoint; `iptables reconcile` captures 169.254.170.23 with it.
    assert "IMDS_BROKER_CONTAINER_CREDENTIALS" in helps()[()].env
    assert "IMDS_BROKER_CONTAINER_CREDENTIALS" in helps()[("iptables", "reconcile")].env


def test_the_pod_identity_injection_component_ships_the_policy_file_unchanged():
    docs = list(render_composed(("overlays/eks",), ("components/pod-identity-injection",)))
    shipped = [d for d in yaml.safe_load_all((DEPLOY / "components/pod-identity-injection/pod-identity-injection.yaml").read_text()) if d]
    added = [d for d in docs if d["kind"].startswith("MutatingAdmissionPolicy")]
    assert added == shipped
    assert [d for d in docs if d not in added] == list(render_dir("overlays/eks"))
    # Cluster-scoped, as the API defines them: no namespace from anywhere.
    assert all("namespace" not in d["metadata"] for d in added)


APP = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: apps
  labels: {labels}
spec:
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
        - name: app
          image: registry.example.com/{name}:1
          env: [{{name: LOG, value: debug}}]
      volumes: [{{name: data, emptyDir: {{}}}}]
"""


def render_app(tmp_path, component: str) -> dict[str, dict]:
    """A user's kustomization: two Deployments (one labelled) and the component; by name."""
    (tmp_path / "apps.yaml").write_text(
        APP.format(name="billing", labels='{imds-broker.io/container-credentials: "true"}') + "---\n"
        + APP.format(name="reports", labels="{team: finance}")
    )
    rel = os.path.relpath(DEPLOY / "components" / component, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["apps.yaml"],
         "components": [rel]}))
    return {d["metadata"]["name"]: d for d in render(tmp_path)}


def test_the_pod_identity_workload_component_patches_the_labelled_workload_only(tmp_path):
    apps = render_app(tmp_path, "pod-identity-workload")
    for version in KUBERNETES_VERSIONS:
        assert checks.schema_problems(list(apps.values()), version) == []
    spec = checks.pod_spec(apps["billing"])
    (app,) = spec["containers"]
    mount = "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount"
    assert env_of(app) == {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": f"{mount}/eks-pod-identity-token",
        "LOG": "debug",
    }
    assert app["volumeMounts"] == [{"name": "eks-pod-identity-token", "mountPath": mount, "readOnly": True}]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert set(volumes) == {"data", "eks-pod-identity-token"}
    assert volumes["eks-pod-identity-token"]["projected"]["sources"] == [{"serviceAccountToken": {
        "audience": "pods.eks.amazonaws.com", "expirationSeconds": 86400, "path": "eks-pod-identity-token"}}]
    untouched = checks.pod_spec(apps["reports"])
    assert untouched["containers"][0]["env"] == [{"name": "LOG", "value": "debug"}]
    assert "volumeMounts" not in untouched["containers"][0]
    assert [v["name"] for v in untouched["volumes"]] == ["data"]


# --- uninstall ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_uninstall_runs_iptables_uninstall_with_the_capture_containers_privileges(overlay):
    uninstall = list(render_dir("uninstall"))
    assert checks.uninstall_problems(uninstall, list(render_dir(f"overlays/{overlay}"))) == []


def test_the_uninstall_args_render_as_written():
    # tests/e2e/test_e2e.py runs the binary with the args of deploy/uninstall/daemonset.yaml as written.
    written = yaml.safe_load((DEPLOY / "uninstall" / "daemonset.yaml").read_text())
    rendered = daemonset(list(render_dir("uninstall")))
    init = lambda ds: checks.container(checks.pod_spec(ds), "initContainers", "uninstall")  # noqa: E731
    assert init(rendered)["args"] == init(written)["args"] == ["iptables", "uninstall"]


def test_the_uninstall_lives_outside_the_agents_namespace_and_holds_no_token():
    docs = list(render_dir("uninstall"))
    agent_namespaces = {d["metadata"]["name"] for d in render_dir("overlays/eks") if d["kind"] == "Namespace"}
    ds = daemonset(docs)
    assert ds["metadata"]["namespace"] not in agent_namespaces, "deleting the agent would delete the uninstall"
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"} == {ds["metadata"]["namespace"]}
    assert checks.pod_spec(ds)["automountServiceAccountToken"] is False
    assert {d["kind"] for d in docs} == {"Namespace", "DaemonSet"}



def test_the_oidc_check_cron_job_checks_a_published_copy_with_only_issuer_discovery_rights():
    docs = list(render_composed(("overlays/on-prem",), ("components/oidc-check",)))
    (job,) = [d for d in docs if d["kind"] == "CronJob"]
    spec = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["args"][:2] == ["oidc", "export"]
    assert any(a.startswith("--check=https://") for a in container["args"]), container["args"]
    assert container["image"] == f"imds-broker:{cargo_version()}"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (binding,) = [d for d in docs if d["kind"] == "ClusterRoleBinding" and d["metadata"]["name"] == "imds-broker-oidc-check"]
    assert binding["roleRef"]["name"] == "system:service-account-issuer-discovery"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": spec["serviceAccountName"], "namespace": "imds-broker"}]
