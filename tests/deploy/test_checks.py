"""The checks of checks.py fail on broken manifests: each case takes a correct rendering (the eks overlay,
the uninstall), breaks one thing, and expects a problem naming it. The same correct renderings give no
problem at all (test_manifests.py), so these show that every check can fail and fails for the reason
given.
"""

from __future__ import annotations

import copy

import pytest

import checks
from render import cargo_version, helps, render_dir

VERSION = "1.30"


def eks() -> list[dict]:
    return copy.deepcopy(list(render_dir("overlays/eks")))


def uninstall() -> list[dict]:
    return copy.deepcopy(list(render_dir("uninstall")))


def spec_of(docs):
    return checks.pod_spec(checks.only_daemonset(docs))


def container(docs, name, field="containers"):
    return checks.container(spec_of(docs), field, name)


def of_kind(docs, kind):
    return next(d for d in docs if d["kind"] == kind)


def one_problem(problems: list[str], *needles: str) -> None:
    assert len(problems) == 1, problems
    for needle in needles:
        assert needle in problems[0], (needle, problems[0])


# --- schemas -----------------------------------------------------------------------------------------


def test_the_correct_renderings_have_no_schema_problem():
    assert checks.schema_problems(eks(), VERSION) == []
    assert checks.schema_problems(uninstall(), VERSION) == []


def break_unknown_pod_field(docs):
    spec_of(docs)["hostNetwrok"] = True
    return "hostNetwrok"


def break_field_type(docs):
    spec_of(docs)["terminationGracePeriodSeconds"] = "15"
    return "terminationGracePeriodSeconds"


def break_container_field(docs):
    container(docs, "capture")["securityContext"]["capabilities"]["adds"] = ["NET_ADMIN"]
    return "adds"


def break_policy_field(docs):
    of_kind(docs, "ValidatingAdmissionPolicy")["spec"]["validations"][0]["expresion"] = "true"
    return "expresion"


def break_policy_enum(docs):
    of_kind(docs, "ValidatingAdmissionPolicyBinding")["spec"]["validationActions"] = "Deny"
    return "validationActions"


def break_rbac(docs):
    of_kind(docs, "ClusterRole")["rules"][0]["verb"] = ["get"]
    return "verb"


@pytest.mark.parametrize(
    "breaker",
    [break_unknown_pod_field, break_field_type, break_container_field, break_policy_field, break_policy_enum, break_rbac],
)
def test_a_manifest_the_schema_does_not_allow_is_a_problem(breaker):
    docs = eks()
    field = breaker(docs)
    problems = checks.schema_problems(docs, VERSION)
    one_problem(problems, f"Kubernetes {VERSION}")
    assert field in problems[0] or "is not of type" in problems[0], problems


def test_a_kind_without_a_schema_is_a_problem_not_a_pass():
    docs = [{"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}]
    one_problem(checks.schema_problems(docs, VERSION), "Widget/w", "no schema")


def test_a_kind_newer_than_the_version_checked_is_a_problem():
    # MutatingAdmissionPolicy is in admissionregistration.k8s.io/v1 only from Kubernetes 1.36.
    docs = [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingAdmissionPolicy",
            "metadata": {"name": "m"},
            "spec": {},
        }
    ]
    one_problem(checks.schema_problems(docs, "1.30"), "no schema")


def pod_monitor():
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": "imds-broker", "namespace": "imds-broker"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "podMetricsEndpoints": [{"port": "metrics"}]},
    }


def prometheus_rule():
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "imds-broker"},
        "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up == 0", "for": "5m"}]}]},
    }


def test_the_crd_schemas_accept_what_they_describe():
    assert checks.schema_problems([pod_monitor(), prometheus_rule()], VERSION) == []


@pytest.mark.parametrize(
    "make,path,value",
    [
        (pod_monitor, ("spec", "podMetricEndpoints"), [{"port": "metrics"}]),
        (pod_monitor, ("spec", "selector", "matchLabel"), {"a": "b"}),
        (pod_monitor, ("spec", "podMetricsEndpoints"), [{"port": 9181}]),
        (prometheus_rule, ("spec", "groups"), [{"name": "g", "rules": [{"alert": "A", "expr": "1", "for": "5 min"}]}]),
        (prometheus_rule, ("spec", "groups"), [{"name": "g", "rules": [{"expr": "1"}]}]),
    ],
)
def test_a_crd_object_its_schema_does_not_allow_is_a_problem(make, path, value):
    doc = make()
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    one_problem(checks.schema_problems([doc], VERSION), doc["kind"])


# --- flags and environment ---------------------------------------------------------------------------


def test_the_correct_renderings_have_no_cli_problem():
    assert checks.cli_problems(eks(), helps()) == []
    assert checks.cli_problems(uninstall(), helps()) == []


def test_help_parsing_finds_flags_and_variables():
    main = helps()[()]
    assert {"--node-name", "--listen", "--upstream-imds", "--token-key-file"} <= main.flags
    assert {"NODE_NAME", "AWS_REGION", "IMDS_BROKER_UPSTREAM_IMDS"} <= main.env
    reconcile = helps()[("iptables", "reconcile")]
    assert "--status-file" in reconcile.flags and "--region" not in reconcile.flags
    assert "IMDS_BROKER_HOST_INTERFACE" in reconcile.env and "AWS_REGION" not in reconcile.env


def add_arg(name, arg, field="containers"):
    def breaker(docs):
        container(docs, name, field)["args"].append(arg)

    return breaker


def add_env(name, var):
    def breaker(docs):
        container(docs, name)["env"].append({"name": var, "value": "x"})

    return breaker


def set_args(name, args):
    def breaker(docs):
        container(docs, name)["args"] = args

    return breaker


def set_command(docs):
    container(docs, "server")["command"] = ["/bin/sh", "-c"]


@pytest.mark.parametrize(
    "breaker,needle",
    [
        (add_arg("server", "--no-such-flag=1"), "--no-such-flag is not a flag of `imds-broker`"),
        # A flag of the agent, but not of the subcommand the capture container runs.
        (add_arg("capture", "--region=us-east-1"), "--region is not a flag of `imds-broker iptables reconcile`"),
        (add_arg("server", "--iptables-reconcile-intervall=5s"), "--iptables-reconcile-intervall"),
        (add_arg("server", "eni+"), "'eni+' is not a --flag"),
        (add_env("server", "IMDS_BROKER_TOKEN_KEYFILE"), "IMDS_BROKER_TOKEN_KEYFILE is not read by `imds-broker`"),
        (add_env("capture", "AWS_REGION"), "AWS_REGION is not read by `imds-broker iptables reconcile`"),
        (set_args("capture", ["iptables", "flush"]), "no subcommand `imds-broker iptables flush`"),
        (set_command, "sets command"),
    ],
)
def test_a_flag_or_variable_the_binary_does_not_have_is_a_problem(breaker, needle):
    docs = eks()
    breaker(docs)
    one_problem(checks.cli_problems(docs, helps()), needle)


def test_an_unknown_flag_of_the_uninstall_is_a_problem():
    docs = uninstall()
    add_arg("uninstall", "--all", "initContainers")(docs)
    one_problem(checks.cli_problems(docs, helps()), "--all is not a flag of `imds-broker iptables uninstall`")


def test_manifests_without_our_container_are_a_problem():
    docs = [d for d in eks() if d["kind"] != "DaemonSet"]
    one_problem(checks.cli_problems(docs, helps()), "no imds-broker container")


# --- images ------------------------------------------------------------------------------------------


def test_the_correct_renderings_have_no_image_problem():
    assert checks.image_problems(eks(), cargo_version()) == []


@pytest.mark.parametrize(
    "image,needle",
    [
        ("imds-broker:0.0.9", "not 'imds-broker:"),
        ("imds-broker", "not 'imds-broker:"),
        ("registry.example.com:5000/imds-broker:" + cargo_version(), "not 'imds-broker:"),
        ("imds-broker@sha256:" + "0" * 64, "not 'imds-broker:"),
        ("busybox:1.36", "unexpected image 'busybox:1.36'"),
    ],
)
def test_an_image_other_than_the_cargo_version_is_a_problem(image, needle):
    docs = eks()
    container(docs, "server")["image"] = image
    one_problem(checks.image_problems(docs, cargo_version()), "containers/server", needle)


def test_a_version_other_than_cargos_is_a_problem():
    problems = checks.image_problems(eks(), "9.9.9")
    assert len(problems) == 2 and all("not 'imds-broker:9.9.9'" in p for p in problems), problems


def test_image_names_are_read_without_tag_or_digest():
    assert checks.image_name("imds-broker:0.1.0") == "imds-broker"
    assert checks.image_name("registry.example.com:5000/team/imds-broker:0.1.0") == "registry.example.com:5000/team/imds-broker"
    assert checks.image_name("imds-broker@sha256:abc") == "imds-broker"
    assert checks.is_ours("registry.example.com:5000/imds-broker")
    assert not checks.is_ours("imds-broker-fork:0.1.0")
    assert not checks.is_ours("registry.k8s.io/pause:3.10")


# --- uninstall ---------------------------------------------------------------------------------------


def test_the_correct_uninstall_has_no_problem():
    assert checks.uninstall_problems(uninstall(), eks()) == []


def drop_net_raw(docs):
    container(docs, "uninstall", "initContainers")["securityContext"]["capabilities"]["add"] = ["NET_ADMIN"]


def run_as_user(docs):
    container(docs, "uninstall", "initContainers")["securityContext"]["runAsUser"] = 65532


def wrong_args(docs):
    container(docs, "uninstall", "initContainers")["args"] = ["iptables", "reconcile"]


def wrong_command(docs):
    container(docs, "uninstall", "initContainers")["command"] = ["/bin/imds-broker"]


def wrong_image(docs):
    container(docs, "uninstall", "initContainers")["image"] = "imds-broker:0.0.1"


def pod_network(docs):
    spec_of(docs)["hostNetwork"] = False


def no_lock(docs):
    container(docs, "uninstall", "initContainers")["volumeMounts"] = []


def fewer_tolerations(docs):
    spec_of(docs)["tolerations"] = [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]


def no_seccomp(docs):
    del spec_of(docs)["securityContext"]


@pytest.mark.parametrize(
    "breaker,needle",
    [
        (drop_net_raw, "securityContext"),
        (run_as_user, "securityContext"),
        (wrong_args, "not `iptables uninstall`"),
        (wrong_command, "not `iptables uninstall`"),
        (wrong_image, "image 'imds-broker:0.0.1'"),
        (pod_network, "hostNetwork"),
        (no_lock, "xtables lock"),
        (fewer_tolerations, "taints"),
        (no_seccomp, "pod securityContext"),
    ],
)
def test_an_uninstall_unlike_the_capture_container_is_a_problem(breaker, needle):
    docs = uninstall()
    breaker(docs)
    one_problem(checks.uninstall_problems(docs, eks()), needle)


def test_a_missing_uninstall_step_is_a_problem():
    docs = uninstall()
    spec_of(docs)["initContainers"][0]["name"] = "cleanup"
    one_problem(checks.uninstall_problems(docs, eks()), "no init container uninstall")


def test_an_env_reference_to_a_variable_defined_later_is_a_problem():
    help_ = checks.Help(flags={"--x"}, env={"NODE_IP", "LISTEN"})
    doc = {"kind": "DaemonSet", "metadata": {"name": "d"}, "spec": {"template": {"spec": {"containers": [{
        "name": "c", "image": "imds-broker:1", "args": [],
        "env": [{"name": "LISTEN", "value": "$(NODE_IP):1"}, {"name": "NODE_IP", "value": "1.2.3.4"}],
    }]}}}}
    problems = checks.cli_problems([doc], {(): help_})
    assert len(problems) == 1 and "$(NODE_IP)" in problems[0], problems
