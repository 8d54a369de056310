"""deploy/: every manifest parses and agrees with the code (metric names and labels, ports,
config schema, secrets), the images pin torch and run as non-root, the container health check
works against a real sidecar, and ``import sidecar`` stays light (Docker cannot run here)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "forensics-dashboard.json"
TARGET_LABELS = {"job", "instance", "component"}     # added by Prometheus / scrape config


def _yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _k8s(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for p in sorted(K8S.glob("*.yaml")) for d in _yaml_docs(p)
             if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


# -- parsing -------------------------------------------------------------------------------------


def test_every_manifest_parses() -> None:
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
    assert len(files) >= 12
    for path in files:
        if path.suffix == ".json":
            assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict), path
        else:
            assert _yaml_docs(path), f"{path} is empty"
    for doc in (d for p in K8S.glob("*.yaml") for d in _yaml_docs(p)):
        assert {"apiVersion", "kind"} <= set(doc), doc
        if doc["kind"] not in ("Namespace", "Kustomization"):
            assert doc["metadata"]["namespace"] == "model-forensics", doc["metadata"]
    kust = _yaml_docs(K8S / "kustomization.yaml")[0]
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S.glob("*.yaml")
                                               if p.name != "kustomization.yaml")


# -- metric names and labels ----------------------------------------------------------------------


def _code_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """Exposed series name → (family, label names), from the real metric classes."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from integrations._metrics import RecorderMetrics
    from sidecar.telemetry import SidecarMetrics, sidecar_metrics

    out: dict[str, tuple[str, frozenset[str]]] = {}
    families: dict[type, set[str]] = {}
    for make in (SidecarMetrics, RecorderMetrics):
        reg = CollectorRegistry()
        owner = make(registry=reg)
        instruments = [*vars(owner).values(), *getattr(owner, "instruments", {}).values()]
        labels = {m._name: frozenset(m._labelnames) for m in instruments
                  if isinstance(m, MetricWrapperBase)}
        families[make] = {fam.name for fam in reg.collect()}
        for fam in reg.collect():
            names = {"counter": [f"{fam.name}_total"], "gauge": [fam.name],
                     "histogram": [f"{fam.name}_{s}" for s in ("bucket", "sum", "count")]}
            for series in names[fam.type]:
                extra = {"le"} if series.endswith("_bucket") else set()
                out[series] = (fam.name, labels[fam.name] | extra)
    # every metric the sidecar declares is a family, and nothing else is
    assert families[SidecarMetrics] == {f"forensics_{m.name}" for m in sidecar_metrics()}
    assert len({fam for fam, _ in out.values()}) == len(sidecar_metrics()) + \
        len(families[RecorderMetrics])
    return out


def _exprs() -> Iterator[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            yield f"dashboard panel {panel['title']!r}", t["expr"]
    for group in _yaml_docs(DEPLOY / "prometheus" / "alerts.yaml")[0]["groups"]:
        for rule in group["rules"]:
            yield f"alert {rule['alert']}", rule["expr"]


def test_every_referenced_metric_and_label_exists_in_code() -> None:
    code = _code_metrics()
    used: set[str] = set()
    for where, expr in _exprs():
        names = set(re.findall(r"\b(forensics_[a-z0-9_]+)", expr))
        for name in names:
            assert name in code, f"{where}: {name} is not a metric of the code: {sorted(code)}"
        used |= {code[n][0] for n in names}
        allowed = set().union(*(code[n][1] for n in names)) | TARGET_LABELS if names else \
            TARGET_LABELS
        for sel in re.finditer(r"(forensics_[a-z0-9_]+)\{([^}]*)\}", expr):
            for label in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", sel.group(2)):
                assert label in code[sel.group(1)][1] | TARGET_LABELS, \
                    f"{where}: {sel.group(1)} has no label {label!r}"
        for grouping in re.findall(r"\b(?:by|without|ignoring|on)\s*\(([^)]*)\)", expr):
            for label in filter(None, (s.strip() for s in grouping.split(","))):
                assert label in allowed, f"{where}: grouping label {label!r} not on {names}"
    families = {fam for fam, _ in code.values()}
    dash_used = {code[n][0] for w, e in _exprs() if w.startswith("dashboard")
                 for n in re.findall(r"\b(forensics_[a-z0-9_]+)", e)}
    assert dash_used == families, f"metrics missing from the dashboard: {families - dash_used}"
    assert used == families


def test_dashboard_shows_scores_with_exemplars() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dash["uid"] == "model-forensics"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    heat = [p for p in dash["panels"] if p["type"] == "heatmap"]
    assert any("forensics_anomaly_score_bucket" in t["expr"] and t.get("exemplar")
               for p in heat for t in p["targets"])
    quant = [t for p in dash["panels"] for t in p.get("targets", [])
             if "histogram_quantile" in t["expr"] and "anomaly_score" in t["expr"]]
    assert quant and all(t.get("exemplar") for t in quant)
    from sidecar.telemetry import sidecar_metrics

    buckets = {f"forensics_{m.name}": m.buckets for m in sidecar_metrics() if m.buckets}
    assert {"forensics_anomaly_score", "forensics_anomaly_p"} <= set(buckets)
    for where, expr in _exprs():         # le="x" must be a real bucket boundary of its histogram
        for name, le in re.findall(r'(forensics_[a-z_]+)_bucket\{le="([^"]+)"\}', expr):
            assert name in buckets and float(le) in buckets[name], f"{where}: {name} le={le}"


# -- Kubernetes ---------------------------------------------------------------------------------


def _embedded_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    from sidecar._config import load_config

    secret = _k8s("Secret")
    for key, value in secret["stringData"].items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "sidecar.yaml"
    path.write_text(_k8s("ConfigMap")["data"]["sidecar.yaml"], encoding="utf-8")
    return load_config(path)


def test_configmap_loads_with_the_sidecar_loader(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    from sidecar._config import SidecarConfig

    cfg = _embedded_config(monkeypatch, tmp_path)
    defaults = SidecarConfig()
    assert cfg.grpc.port == defaults.grpc.port == 7431
    assert int(cfg.metrics.address.rsplit(":", 1)[1]) == \
        int(defaults.metrics.address.rsplit(":", 1)[1]) == 9464
    assert cfg.grpc.host == "0.0.0.0" and cfg.metrics.address.startswith("0.0.0.0:")
    assert cfg.auth.enabled and set(cfg.auth.tokens.values()) == {"demo"}
    assert cfg.modules.cf.anomaly_threshold == defaults.modules.cf.anomaly_threshold
    # every token_env is a key of the Secret and an env var of the container, from that key
    raw = yaml.safe_load(_k8s("ConfigMap")["data"]["sidecar.yaml"])
    token_envs = {e["token_env"] for e in raw["auth"]["tokens"] + raw["auth"]["admin_tokens"]}
    container = _k8s("StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
            if "valueFrom" in e}
    assert token_envs == set(_k8s("Secret")["stringData"]) == set(refs)
    assert all(r["name"] == "forensics-sidecar-tokens" and r["key"] == n
               for n, r in refs.items())
    from integrations.errors import ConfigError
    from sidecar._config import load_config

    monkeypatch.delenv("FORENSICS_TOKEN_DEMO")      # a missing Secret key stops the sidecar
    with pytest.raises(ConfigError, match="FORENSICS_TOKEN_DEMO"):
        load_config(tmp_path / "sidecar.yaml")


def test_statefulset_service_ports_and_probes(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    from sidecar.api import v1

    cfg = _embedded_config(monkeypatch, tmp_path)
    grpc_port, metrics_port = cfg.grpc.port, int(cfg.metrics.address.rsplit(":", 1)[1])
    sts = _k8s("StatefulSet")
    spec = sts["spec"]
    assert spec["replicas"] == 1 and "single-writer" in (K8S / "statefulset.yaml").read_text()
    assert spec["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == \
        {"grpc": grpc_port, "metrics": metrics_port}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["data"] == cfg.data_dir
    assert c["args"] == ["--config", f"{mounts['config']}/sidecar.yaml"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == grpc_port
    assert c["readinessProbe"]["grpc"]["service"] == v1.SERVICE_NAME
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    sec = pod["securityContext"]
    assert sec["runAsNonRoot"] and sec["runAsUser"] != 0
    assert pod["terminationGracePeriodSeconds"] > cfg.grpc.grace_s
    svc = _k8s("Service", "forensics-sidecar")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == \
        {"grpc": (grpc_port, "grpc"), "metrics": (metrics_port, "metrics")}
    labels = spec["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert _k8s("Service", spec["serviceName"])["spec"]["clusterIP"] == "None"
    ann = spec["template"]["metadata"]["annotations"]
    assert int(ann["prometheus.io/port"]) == metrics_port


# -- Docker ------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile.sidecar", "Dockerfile.app-example"])
def test_dockerfiles(name: str) -> None:
    path = DOCKER / name
    ins = _instructions(path)
    assert ins[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    torch_installs = re.findall(r"pip install[^&;]*?\btorch\S*", runs)
    assert torch_installs and all(t.endswith("torch==2.13.0") for t in torch_installs)
    assert "--constraint /opt/constraints.txt" in runs            # nothing replaces it later
    assert re.search(r"pip install --constraint \S+ \"\.\[sidecar", runs)
    text = path.read_text(encoding="utf-8")
    assert "CPU wheel" in text                             # noted, with no index host named
    assert set(re.findall(r"://([^/:'\"]+)", text)) <= {"127.0.0.1"}
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    last_user = max(i for i, (w, _) in enumerate(ins) if w == "USER")
    start = max(i for i, (w, _) in enumerate(ins) if w in ("CMD", "ENTRYPOINT"))
    assert last_user < start                 # the server process runs as that user
    assert any(w == "HEALTHCHECK" for w, _ in ins)
    for word, rest in ins:                    # every COPY source exists (context = repo root)
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _dest = shlex.split(rest)
            for src in sources:
                assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"


def test_container_healthcheck_probes_a_real_sidecar(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The HEALTHCHECK's python one-liner, run against a real sidecar: exit 0 while SERVING,
    an error once it stopped."""
    from sidecar._config import SidecarConfig
    from sidecar._server import create_server

    (cmd,) = [rest for w, rest in _instructions(DOCKER / "Dockerfile.sidecar")
              if w == "HEALTHCHECK"]
    argv = json.loads(cmd[cmd.index("CMD") + 3:].strip())
    assert argv[:2] == ["python", "-c"]
    code = compile(argv[2], "HEALTHCHECK", "exec")
    sc, port = create_server(SidecarConfig.defaults(data_dir=str(tmp_path)), port=0)
    monkeypatch.setenv("FORENSICS_HEALTH_ADDRESS", f"127.0.0.1:{port}")
    sc.start()
    try:
        with pytest.raises(SystemExit) as e:
            exec(code, {})
        assert e.value.code == 0
    finally:
        sc.stop(grace=0.5)
    with pytest.raises(Exception) as failed:
        exec(code, {})
    assert not (isinstance(failed.value, SystemExit) and failed.value.code == 0)


def test_container_config_and_compose_agree() -> None:
    from sidecar._config import SidecarConfig

    raw = _yaml_docs(DOCKER / "sidecar.yaml")[0]
    for entry in raw["auth"]["tokens"] + raw["auth"]["admin_tokens"]:
        entry.pop("token_env")
        entry["token"] = "x" * 16 + str(len(entry))
    raw["auth"]["admin_tokens"] = [e["token"] + "a" for e in raw["auth"]["admin_tokens"]]
    cfg = SidecarConfig.from_dict(raw)
    compose = _yaml_docs(DOCKER / "compose.yaml")[0]
    sidecar = compose["services"]["sidecar"]
    assert {"forensics-data:" + cfg.data_dir} <= set(sidecar["volumes"])
    assert "forensics-data" in compose["volumes"]
    published = {int(p.rsplit(":", 1)[1]) for p in sidecar["ports"]}
    metrics_port = int(cfg.metrics.address.rsplit(":", 1)[1])
    assert published == {cfg.grpc.port, metrics_port}
    envs = set(_yaml_docs(DOCKER / "sidecar.yaml")[0]["auth"]["tokens"][0].values())
    assert envs & set(sidecar["environment"])              # token_env provided by compose
    host = sidecar["hostname"]
    app = compose["services"]["app"]
    assert app["environment"]["FORENSICS_SIDECAR"] == f"{host}:{cfg.grpc.port}"
    prom = _yaml_docs(DOCKER / "prometheus.yaml")[0]
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in prom["scrape_configs"]}
    assert targets["forensics-sidecar"] == [f"{host}:{metrics_port}"]
    assert targets["forensics-middleware"] == ["app:8000"]
    for service in compose["services"].values():            # bind mounts exist in the repo
        for vol in service.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("."):
                assert (DOCKER / src).resolve().exists(), src


# -- the package the images run ------------------------------------------------------------------


def test_import_sidecar_is_light_and_exports_are_lazy() -> None:
    import sidecar

    assert sidecar.__all__ == sorted(sidecar.__all__)
    assert set(sidecar.__all__) == set(sidecar._LAZY)
    for name in ("create_server", "Sidecar", "SidecarClient", "LocalStore", "IncidentStore",
                 "load_config", "SidecarTelemetry", "SidecarMetrics"):
        assert name in sidecar.__all__
    for name in sidecar.__all__:
        assert getattr(sidecar, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sidecar.nope  # noqa: B018
    code = ("import sys, sidecar; print(sorted(m for m in ('torch', 'duckdb', 'transformers', "
            "'opentelemetry.sdk', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
