"""The alerting rules (deploy/prometheus/rules.yaml): valid for Debian's promtool, unit-tested by
rules.test.yaml with every alert both firing and quiet, and shipped unchanged as the PrometheusRule of
deploy/components/prometheus-rules/.

The end-to-end suite (tests/e2e/test_prometheus.py) evaluates the same expressions against a real
Prometheus scraping a real agent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "rules.test.yaml"
COMPONENT = ROOT / "deploy" / "components" / "prometheus-rules"


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: tests/run.sh installs Debian's prometheus package")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_accepts_the_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_the_rule_unit_tests_pass():
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_threshold_fails_the_unit_tests(tmp_path):
    # The unit tests must be able to fail: move one threshold and they do.
    text = RULES.read_text()
    assert "imds_broker_watch_silence_seconds) > 300" in text
    (tmp_path / "rules.yaml").write_text(text.replace("imds_broker_watch_silence_seconds) > 300",
                                                      "imds_broker_watch_silence_seconds) > 3000"))
    shutil.copy(RULE_TESTS, tmp_path / "rules.test.yaml")
    result = promtool("test", "rules", str(tmp_path / "rules.test.yaml"))
    assert result.returncode != 0
    assert "ImdsBrokerWatchStale" in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet():
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    for alert in alerts():
        name = alert["alert"]
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in mine), f"{name} is never tested firing"
        assert any(not case.get("exp_alerts") for case in mine), f"{name} is never tested quiet"


def test_the_prometheusrule_component_carries_exactly_these_groups():
    documents = [d for d in yaml.safe_load_all((COMPONENT / "prometheusrule.yaml").read_text()) if d]
    assert len(documents) == 1
    rule = documents[0]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    kustomization = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Component"
    assert kustomization["resources"] == ["prometheusrule.yaml"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_an_overlay_with_the_component_renders_the_same_groups():
    with tempfile.TemporaryDirectory() as overlay:
        Path(overlay, "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "components": [os.path.relpath(COMPONENT, overlay)],
        }))
        result = subprocess.run(["kubectl", "kustomize", overlay], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert [d["kind"] for d in rendered] == ["PrometheusRule"]
    assert rendered[0]["spec"] == yaml.safe_load(RULES.read_text())
