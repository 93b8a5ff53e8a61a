"""deploy/prometheus: the alert rules pass `promtool check rules` and their unit tests (`promtool test rules`),
the Prometheus config is valid, every alert links to the section of docs/operations.md that says what to do,
and the dashboard queries only metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import service_missing

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
ALERTS = {rule["alert"]: rule for group in RULES["groups"] for rule in group["rules"] if "alert" in rule}
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()
# The names billing.metrics exposes (tests/test_metrics.py checks the exporter against this list too).
BILLING_METRICS = {
    "billing_invoices",
    "billing_charge_attempts_total",
    "billing_review_queue_items",
    "billing_review_oldest_age_seconds",
    "billing_due_lag_seconds",
    "billing_paused",
    "billing_refunds",
    "billing_refund_nearest_deadline_seconds",
    "billing_periodic_last_run_timestamp_seconds",
    "billing_recovered_invoices_total",
    "billing_mrr_minor_units",
    "billing_webhook_backlog",
    "billing_webhook_endpoint_failing",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        service_missing("promtool", "Debian's `prometheus` package provides it: apt-get install prometheus")
    return subprocess.run(["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


def test_the_rules_pass_promtool_check() -> None:
    out = promtool("check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 10 rules found" in out.stdout


def test_the_rules_pass_their_unit_tests() -> None:
    out = promtool("test", "rules", "alerts.test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts.test.yml").read_text()))
    assert len(tested) >= 3
    assert tested <= set(ALERTS)


def test_the_prometheus_config_is_valid() -> None:
    out = promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_issue_s_alerts_are_all_there() -> None:
    assert set(ALERTS) == {
        "BillingPaused",
        "BillingDueLagHigh",
        "BillingReviewItemOld",
        "BillingDeclineShareHigh",
        "BillingPeriodicTaskNotRun",
        "BillingRefundDeadlineNear",
        "BillingWebhookEndpointFailing",
        "BillingMetricsDown",
    }


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("name", sorted(ALERTS))
def test_every_alert_says_what_to_do_and_links_to_its_section(name: str) -> None:
    annotations = ALERTS[name]["annotations"]
    assert annotations["summary"] and annotations["description"]
    path, anchor = annotations["runbook_url"].split("#")
    assert path == "docs/operations.md"
    assert anchor in _anchors(OPERATIONS)
    assert ALERTS[name]["labels"]["severity"] in ("critical", "warning")


def test_the_alerts_and_the_dashboard_use_only_metrics_that_exist() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "billing.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    exprs += [rule["expr"] for group in RULES["groups"] for rule in group["rules"]]
    used = {name for expr in exprs for name in re.findall(r"(?<![:\w])(billing_[a-z_]+|flower_[a-z_]+)\b", expr)}
    assert {name for name in used if name.startswith("billing_")} <= BILLING_METRICS
    assert {name for name in used if name.startswith("flower_")} <= {"flower_events_total"}
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("error code", "due lag", "review queue", "pause", "throughput", "mrr"):
        assert topic in titles
