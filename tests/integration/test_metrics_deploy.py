"""The shipped Prometheus config and alert rules: valid for promtool, the alerts fire in promtool's
rule unit tests, and every jobq metric they name is one jobq exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobq import JobQ
from jobq.metrics import Metrics
from tests.harness.tools import require_tool

pytestmark = [pytest.mark.integration]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROOT = DEPLOY.parent


def promtool(*args: str) -> None:
    tool = require_tool("promtool", "prometheus", "rule files not checked")
    res = subprocess.run([tool, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_prometheus_config_is_valid() -> None:
    promtool("check", "config", "prometheus.yml")


def test_alert_rules_are_valid_and_fire() -> None:
    promtool("check", "rules", "alerts.yml")
    promtool("test", "rules", "alerts_test.yml")


def test_alerts_use_only_exported_metric_names(app: JobQ) -> None:
    app.enqueue("t", queue="q")
    m = Metrics(app)
    m.job_started("q", "t", 0.1)
    m.job_completed("q", "t", 0.1)
    m.job_failed("q", "t", 0.1, "dead")
    m.job_failed("q", "t", 0.1, "retry")
    m.job_stale("q", "t")
    m.jobs_reaped("q", 1)
    exported = {
        s.name for fam in text_string_to_metric_families(m.exposition().decode()) for s in fam.samples
    }
    rules = [
        line for line in (DEPLOY / "alerts.yml").read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    used = set(re.findall(r"\bjobq_[a-z_]+", "\n".join(rules)))
    assert used, "no jobq metric in alerts.yml"
    assert used <= exported, used - exported


def test_compose_file_wires_the_services() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "worker-1", "worker-2", "api", "prometheus"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]
    for name in ("worker-1", "worker-2"):
        cmd = services[name]["command"]
        assert cmd[0] == "worker" and "--metrics-port" in cmd
    assert services["api"]["command"][0] == "serve"
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"worker-1:9100", "worker-2:9100", "api:8080"}
