"""The shipped Prometheus assets: every alert has a ``promtool test rules`` case that fires it
(and quiet cases), the cases use the series the code really exports, and both scrape configs load
on the stated minimum version. promtool is Debian's ``prometheus`` package (``.ci/run``
installs it); without it the promtool tests are skipped, saying so."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
PROM = REPO / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus; "
                             ".ci/run installs it)")


def _alerts() -> set[str]:
    rules = yaml.safe_load((PROM / "alerts.yaml").read_text())
    return {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}


def _cases() -> list[dict]:  # type: ignore[type-arg]
    return list(yaml.safe_load((PROM / "alerts.test.yaml").read_text())["tests"])


def test_every_shipped_alert_has_a_case_that_fires_it() -> None:
    fired = {t["alertname"] for case in _cases() for t in case["alert_rule_test"]
             if t.get("exp_alerts")}
    assert fired == _alerts()


def test_the_cases_use_series_the_code_exports_with_its_buckets() -> None:
    from prometheus_client import CollectorRegistry

    from integrations._metrics import RecorderMetrics
    from sidecar._metrics import metric
    from sidecar.telemetry import SidecarMetrics

    names = {"up"}
    for reg in (SidecarMetrics(registry=CollectorRegistry()).registry, CollectorRegistry()):
        RecorderMetrics(registry=reg)
        for fam in reg.collect():
            names |= {fam.name + s for s in ("", "_total", "_bucket", "_count", "_sum")}
    for case in _cases():
        for s in case["input_series"]:
            name, labels = re.fullmatch(r"(\w+)\{(.*)\}", s["series"]).groups()  # type: ignore[union-attr]
            assert name in names, name
            le = re.search(r'le="([^"]+)"', labels)
            if le and le.group(1) != "+Inf":       # a bucket bound the histogram really has
                base = name.removeprefix("forensics_").removesuffix("_bucket")
                assert float(le.group(1)) in (metric(base).buckets or ()), s["series"]


@needs_promtool
def test_promtool_runs_the_rule_tests() -> None:
    r = subprocess.run([str(PROMTOOL), "test", "rules", "alerts.test.yaml"], cwd=PROM,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@needs_promtool
@pytest.mark.parametrize("config", ["prometheus/prometheus.yaml", "docker/prometheus.yaml"])
def test_scrape_configs_load_on_this_promtool(config: str, tmp_path: Path) -> None:
    """Both configs load with the rules beside them (compose mounts alerts.yaml there)."""
    shutil.copy(REPO / "deploy" / config, tmp_path / "prometheus.yaml")
    shutil.copy(PROM / "alerts.yaml", tmp_path / "alerts.yaml")
    r = subprocess.run([str(PROMTOOL), "check", "config", "prometheus.yaml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    version = subprocess.run([str(PROMTOOL), "--version"], capture_output=True, text=True,
                             timeout=60).stdout + r.stderr
    stated = re.search(r"Minimum Prometheus version: (\d+)\.(\d+)",
                       (PROM / "prometheus.yaml").read_text())
    found = re.search(r"version (\d+)\.(\d+)", version)
    assert stated and found
    assert tuple(map(int, found.groups())) >= tuple(map(int, stated.groups()))
