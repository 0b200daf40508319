"""Debian's Prometheus scrapes the agent while a real SDK in a pod gets its credentials; then every
expression of the dashboard (dashboards/imds-broker.json) and of the alerting rules
(deploy/prometheus/rules.yaml) is evaluated through Prometheus's HTTP API.

What counts as passing, for each expression:
- it evaluates (a syntax error, an unknown function, a wrong label are errors), and returns at least
  one series;
- every `imds_broker_*` selector inside it, evaluated alone, returns at least one series, so a
  misspelled metric name or label value fails even inside `or`, a ratio or `absent()`;
- an alert whose condition is empty while healthy (`… > 0`, `… < 600`) is evaluated with its final
  comparison removed, and `absent(X)` as X: the value the alert compares is there.

Prometheus is the `prometheus` binary of Debian's package (installed by tests/run.sh), started here with
its own config and data directory on a loopback port and stopped at the end; never the system service.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import urllib.parse
from pathlib import Path

import pytest
import yaml

import harness
from harness import NODE

DASHBOARD = harness.ROOT / "dashboards" / "imds-broker.json"
RULES = harness.ROOT / "deploy" / "prometheus" / "rules.yaml"
N = 60
ROLE = "e2e-prometheus-role"
SCRAPE_INTERVAL = "1s"
# What Grafana's $__rate_interval becomes here: several scrape intervals.
RATE_INTERVAL = "1m"
SELECTOR = re.compile(r"imds_broker_[a-z0-9_]*[a-z0-9](?:\{[^}]*\})?")
COMPARISON = re.compile(r"^(?P<value>.*\S)\s*(?:==|!=|>=|<=|>|<)\s*-?[0-9.]+(?:e[+-]?[0-9]+)?\s*$")
ABSENT = re.compile(r"^absent\((?P<value>.*)\)$")


class Prometheus:
    """`prometheus` on a free loopback port, scraping the agent every second, with our rules loaded."""

    def __init__(self, agent: harness.Agent, logs: Path):
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is missing: tests/run.sh installs Debian's prometheus package")
        self.dir = Path(tempfile.mkdtemp(prefix="imdsb-prometheus-"))
        self.port = harness.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
                       "evaluation_interval": SCRAPE_INTERVAL},
            "rule_files": [str(RULES)],
            "scrape_configs": [{
                "job_name": "imds-broker",
                # What a Kubernetes scrape config gets by relabelling __meta_kubernetes_pod_node_name.
                "static_configs": [{"targets": [f"127.0.0.1:{agent.metrics_port}"], "labels": {"node": NODE}}],
            }],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process = harness.Process("prometheus", [
            binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
        ], logs)
        try:
            harness.wait_for("prometheus to be ready", lambda: self.process.check_alive()
                             or harness.http("GET", self.url + "/-/ready")[0] == 200, timeout=30)
        except BaseException:
            self.stop()
            raise

    def api(self, path: str, **params: str) -> dict:
        status, text = harness.http("GET", f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        answer = json.loads(text)
        if status != 200 or answer.get("status") != "success":
            raise QueryError(f"{answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def scrapes(self) -> int:
        result = self.query('count_over_time(up{job="imds-broker"}[10m])')
        return int(float(result[0]["value"][1])) if result else 0

    def up(self) -> bool:
        result = self.query('up{job="imds-broker"}')
        return bool(result) and result[0]["value"][1] == "1"

    def stop(self) -> None:
        self.process.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class QueryError(Exception):
    pass


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, expression) for every target of every panel, template variables substituted."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "node" in variables
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL).replace("$node", NODE)
            assert "$" not in expr, f"unsubstituted variable in {panel['title']!r}: {expr}"
            found.append((f"panel {panel['title']!r} {target['refId']}", expr))
    return found


def alert_expressions() -> list[tuple[str, str, str]]:
    """(alert, expression, what to evaluate for series): the expression without its final comparison,
    or absent()'s argument."""
    found = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            expr = " ".join(rule["expr"].split())
            match = ABSENT.match(expr) or COMPARISON.match(expr)
            assert match, f"{rule['alert']}: neither `value <op> number` nor absent(): {expr}"
            found.append((rule["alert"], expr, match.group("value")))
    return found


def test_prometheus_scrapes_the_agent_and_every_panel_and_alert_expression_has_series(node, versions, capsys):
    node.kube.create_service_account("team-p", "default")
    prometheus = Prometheus(node.agent, node.logs)
    try:
        harness.wait_for("three scrapes of the agent", lambda: prometheus.up() and prometheus.scrapes() >= 3,
                         timeout=30)
        # A pod starts and its SDK gets credentials while Prometheus watches.
        pod = node.add_pod(N, "app-prometheus", "team-p", role=ROLE)
        sdk = next(s for s in harness.sdks() if s.name == "boto3/botocore (current)")
        outcome = node.run_sdk(sdk, pod)
        passed = outcome.ok and f"assumed-role/{ROLE}/" in outcome.arn
        harness.record("prometheus: scraped agent", outcome, f"{ROLE} via IMDSv2", passed, versions)
        assert passed, outcome
        seen = prometheus.scrapes()
        harness.wait_for("five more scrapes", lambda: prometheus.scrapes() >= seen + 5, timeout=30)

        # The rules load in Prometheus itself, and evaluate without error.
        rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        assert sorted(r["name"] for r in rules) == sorted(a for a, _, _ in alert_expressions())
        assert all(r["health"] == "ok" for r in rules), rules
        # The dashboard's node variable finds this node.
        assert NODE in prometheus.api("label/node/values", **{"match[]": "imds_broker_build_info"})

        report, failures = [], []

        def evaluate(where: str, expr: str) -> None:
            try:
                count = len(prometheus.query(expr))
            except QueryError as error:
                failures.append(f"{where}: {expr}: {error}")
                report.append((where, expr, "error"))
                return
            report.append((where, expr, count))
            if count == 0:
                failures.append(f"{where}: {expr}: no series")

        def selectors(where: str, expr: str) -> None:
            for selector in sorted(set(SELECTOR.findall(expr))):
                evaluate(f"{where} selector", selector)

        for where, expr in dashboard_expressions():
            evaluate(where, expr)
            selectors(where, expr)
        for alert, expr, value in alert_expressions():
            # The alert itself must evaluate; empty is what a healthy node gives.
            try:
                firing = len(prometheus.query(expr))
            except QueryError as error:
                failures.append(f"alert {alert}: {expr}: {error}")
                firing = "error"
            report.append((f"alert {alert} (as written)", expr, firing))
            evaluate(f"alert {alert} (compared value)", value)
            selectors(f"alert {alert}", value)

        # The check itself catches a misspelled name: its selector is a failure ("no series").
        before = len(failures)
        selectors("canary", "min(imds_broker_credentials_expiry_headrom_seconds)")
        canary = failures[before:]
        del failures[before:]
        assert len(canary) == 1 and canary[0].endswith("no series"), canary
        # The first credentials of the pod started above were counted, with a plausible delay.
        first = prometheus.query(f'imds_broker_credentials_first_delay_seconds_count{{node="{NODE}"}}')
        assert first and float(first[0]["value"][1]) >= 1, first
        headroom = prometheus.query(f'imds_broker_credentials_expiry_headroom_seconds{{node="{NODE}"}}')
        assert headroom and 900 < float(headroom[0]["value"][1]) <= 43200, headroom

        with capsys.disabled():
            print("\n\nexpressions evaluated by Prometheus (series returned):")
            for where, expr, count in report:
                print(f"  {count!s:>5}  {where}: {expr}")
        assert not failures, "\n".join(failures)
    finally:
        prometheus.stop()
        node.topology.remove_pod(N)


def test_promtool_check_metrics_accepts_the_agents_metrics(node):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: tests/run.sh installs Debian's prometheus package")
    status, text = harness.http("GET", f"http://127.0.0.1:{node.agent.metrics_port}/metrics")
    assert status == 200
    assert "imds_broker_credentials_fetches_total" in text
    result = harness.run([promtool, "check", "metrics"], input=text, check=False)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
