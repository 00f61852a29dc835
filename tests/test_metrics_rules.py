"""config/prometheus: the alert rules and the scrape config, checked by promtool."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.metrics import PREFIX
from supervisor.state import DockerFailure, ErrorKind
from tests.test_metrics import make_runtime, record

CONFIG = Path(__file__).resolve().parent.parent / "config" / "prometheus"
ALERTS = CONFIG / "alerts.yml"
ALERTS_TEST = CONFIG / "alerts_test.yml"
PROMETHEUS_YML = CONFIG / "prometheus.yml"

#: The six alerts of the issue.
ALERT_NAMES = {
    "HomelabarrDockerAccessDenied",
    "HomelabarrDockerUnavailable",
    "HomelabarrSupervisorDown",
    "HomelabarrContainerUnhealthy",
    "HomelabarrContainerRestarting",
    "HomelabarrContainerOOMKilled",
}


def promtool(*args: str | Path) -> str:
    """Run promtool in config/prometheus; its output, or a test failure with it."""
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: run tests/run.sh (it installs Debian's prometheus)")
    done = subprocess.run(
        ["promtool", *map(str, args)],
        cwd=CONFIG,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_promtool_check_rules_accepts_the_six_alerts() -> None:
    """promtool check rules finds the six rules of alerts.yml valid."""
    assert "SUCCESS: 6 rules found" in promtool("check", "rules", ALERTS)


def test_promtool_test_rules_passes() -> None:
    """Every promtool unit test of the alerts (firing and not firing) passes."""
    assert "SUCCESS" in promtool("test", "rules", ALERTS_TEST)


def test_prometheus_yml_is_valid_and_scrapes_the_compose_service() -> None:
    """promtool check config accepts prometheus.yml, which loads alerts.yml and targets supervisor:9856."""
    assert "1 rule files found" in promtool("check", "config", PROMETHEUS_YML)
    text = PROMETHEUS_YML.read_text()
    assert '"supervisor:9856"' in text
    assert "job_name: homelabarr-supervisor" in text


def test_alerts_use_only_metrics_the_supervisor_exposes() -> None:
    """Every homelabarr_supervisor_* name in an alert expression is in a real scrape."""
    runtime = make_runtime()
    runtime.cache.upsert(record(1, health="unhealthy"))
    runtime.machine.begin_attempt(now=1.0, cause="start")
    runtime.machine.failed(DockerFailure(ErrorKind.TIMEOUT, "slow", "wait", 1.0), now=1.0)
    exposed = {
        sample.name
        for family in text_string_to_metric_families(runtime.metrics.render()[0].decode())
        for sample in family.samples
    }
    used = set(re.findall(rf"\b{PREFIX}\w+", ALERTS.read_text()))
    assert used, "no supervisor metric in alerts.yml"
    assert used <= exposed


def test_every_alert_is_documented_and_tested_firing_and_not_firing() -> None:
    """Each alert has a summary and a description, and alerts_test.yml checks it firing and silent."""
    rules = ALERTS.read_text()
    blocks = dict(re.findall(r"- alert: (\w+)\n(.*?)(?=\n\s*- alert: |\Z)", rules, re.S))
    assert set(blocks) == ALERT_NAMES
    for name, block in blocks.items():
        assert "summary:" in block and "description:" in block, name
    assert "homelabarr-supervisor doctor" in blocks["HomelabarrDockerAccessDenied"]
    tests = ALERTS_TEST.read_text()
    cases = re.findall(r"alertname: (\w+)\n\s+exp_alerts: ?(\[\]|\S*)", tests)
    firing = {name for name, expected in cases if expected != "[]"}
    silent = {name for name, expected in cases if expected == "[]"}
    assert firing == ALERT_NAMES
    assert silent == ALERT_NAMES
