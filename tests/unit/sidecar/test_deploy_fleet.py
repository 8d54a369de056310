"""The fleet's deploy assets (DESIGN §12): ``configs/examples/fleet.yaml``, the compose stack
``deploy/docker/compose.fleet.yaml`` and the Kubernetes overlay ``deploy/k8s/fleet`` load with the
sidecar's own config loader and agree with each other and with the code (secrets ↔ env vars,
Ray head address ↔ its service and port, catalog DSN ↔ the catalog service, Ray version ↔ the
lock). Docker, kubectl and KubeRay cannot run here: these are static checks, like test_deploy."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
DOCKER = ROOT / "deploy" / "docker"
K8S = ROOT / "deploy" / "k8s"
FLEET = K8S / "fleet"
EXAMPLE = ROOT / "configs" / "examples" / "fleet.yaml"


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _fleet(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for p in sorted(FLEET.glob("*.yaml")) for d in _docs(p)
             if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s/fleet"
    return found[0]


def _load(text: str, env: dict[str, str], tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Any:
    """The sidecar's loader on ``text`` with exactly the env vars the deployment provides."""
    from sidecar._config import load_config

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "sidecar.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def _env_names(raw: dict[str, Any]) -> set[str]:
    """Every environment variable a sidecar config reads (tokens, the catalog DSN)."""
    auth = raw.get("auth", {})
    names = {e["token_env"] for e in auth.get("tokens", []) + auth.get("admin_tokens", [])
             if "token_env" in e}
    return names | {raw["catalog"]["dsn_env"]}


def _ray_pin() -> str:
    lock = (ROOT / "requirements" / "lock.txt").read_text(encoding="utf-8")
    match = re.search(r"^ray==(\S+)$", lock, re.M)
    assert match, "ray is not pinned in requirements/lock.txt"
    return match.group(1)


def _assert_fleet(cfg: Any) -> None:
    assert cfg.catalog.kind == "postgres"
    assert cfg.store.uri.startswith("s3://")
    assert cfg.jobs.executor == "ray" and cfg.jobs.ray.address.startswith("ray://")


def test_example_is_a_fleet_sidecar_config(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _docs(EXAMPLE)[0]
    env = {name: "x" * 24 for name in _env_names(raw)}
    env[raw["catalog"]["dsn_env"]] = "postgresql://forensics@catalog:5432/forensics"
    _assert_fleet(_load(EXAMPLE.read_text(encoding="utf-8"), env, tmp_path, monkeypatch))
    # the config reads no secret from YAML: no DSN, no key in it
    text = EXAMPLE.read_text(encoding="utf-8")
    assert "postgresql://" not in re.sub(r"#.*", "", text)
    assert "secret" not in re.sub(r"#.*", "", text).lower()


# -- compose ---------------------------------------------------------------------------------


def test_compose_fleet_agrees_with_its_config(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    compose = _docs(DOCKER / "compose.fleet.yaml")[0]
    services = compose["services"]
    sidecars = {n: s for n, s in services.items() if n.startswith("sidecar-")}
    assert len(sidecars) >= 2                   # the point of the stack: two on one catalog
    mounts = {n: {v.split(":")[1]: v.split(":")[0] for v in s["volumes"]}
              for n, s in sidecars.items()}
    assert all(m["/etc/forensics/sidecar.yaml"] == "./sidecar-fleet.yaml"
               for m in mounts.values())
    data = {m["/var/lib/forensics"] for m in mounts.values()}
    assert len(data) == len(sidecars)           # each its own spool + receipts volume
    assert data <= set(compose["volumes"])
    published = [p.split(":")[1] for s in sidecars.values() for p in s["ports"]]
    assert len(published) == len(set(published))
    raw = _docs(DOCKER / "sidecar-fleet.yaml")[0]
    assert all(s["environment"] == sidecars["sidecar-a"]["environment"] for s in sidecars.values())
    # compose substitutes ${VAR:-default}: the stack's demo defaults
    env = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", v)
           for k, v in sidecars["sidecar-a"]["environment"].items()}
    assert _env_names(raw) <= set(env) and "$" not in "".join(env.values())
    cfg = _load((DOCKER / "sidecar-fleet.yaml").read_text(encoding="utf-8"), env, tmp_path,
                monkeypatch)
    _assert_fleet(cfg)
    # the catalog DSN names the catalog service with its user and database
    dsn = urllib.parse.urlsplit(env[raw["catalog"]["dsn_env"]])
    catalog = services[dsn.hostname]
    assert dsn.port == 5432 and "pg_isready" in " ".join(catalog["healthcheck"]["test"])
    assert dsn.username == catalog["environment"]["POSTGRES_USER"]
    assert dsn.path.lstrip("/") == catalog["environment"]["POSTGRES_DB"]
    # the Ray client address is the head's service and its client-server port
    ray = urllib.parse.urlsplit(cfg.jobs.ray.address)
    head = services[ray.hostname]
    assert f"--ray-client-server-port={ray.port}" in head["entrypoint"]
    assert any(a.startswith(f"--address={ray.hostname}:") for a in services["ray-worker"]["entrypoint"])
    # the object store endpoint is the stack's MinIO and its bucket is created before ingest
    assert cfg.store.s3.endpoint_override.split(":")[0] in services
    bucket = urllib.parse.urlsplit(cfg.store.uri).netloc
    assert bucket in " ".join(services["minio-init"]["command"])
    # sidecars and Ray pods run one image built with the fleet extra
    images = {s["image"] for n, s in services.items() if n.startswith(("sidecar-", "ray-"))}
    assert len(images) == 1
    assert services["ray-head"]["build"]["args"]["EXTRAS"] == ",fleet"
    # one Ray auth token for head, workers and sidecars (Ray drivers)
    for name in ("ray-head", "ray-worker", *sidecars):
        assert services[name]["environment"]["RAY_AUTH_MODE"] == "token"
        assert services[name]["environment"]["RAY_AUTH_TOKEN"] == \
            sidecars["sidecar-a"]["environment"]["RAY_AUTH_TOKEN"]


def test_dockerfile_installs_the_requested_extras() -> None:
    text = (DOCKER / "Dockerfile.sidecar").read_text(encoding="utf-8")
    assert 'ARG EXTRAS=""' in text and '".[sidecar${EXTRAS}]"' in text
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r"^fleet = \[", pyproject, re.M)


# -- Kubernetes ------------------------------------------------------------------------------


def test_overlay_resources_and_patches_exist() -> None:
    kust = _docs(FLEET / "kustomization.yaml")[0]
    listed = {r for r in kust["resources"] if r != "../"}
    assert "../" in kust["resources"]
    assert listed | {p["path"] for p in kust["patches"]} == \
        {p.name for p in FLEET.glob("*.yaml")} - {"kustomization.yaml"}
    base = [d for p in K8S.glob("*.yaml") for d in _docs(p)]
    for patch in kust["patches"]:                # each patch targets an object of the base
        doc = _docs(FLEET / patch["path"])[0]
        assert any(d.get("kind") == doc["kind"] and
                   d.get("metadata", {}).get("name") == doc["metadata"]["name"] for d in base)
    for doc in (d for p in FLEET.glob("*.yaml") for d in _docs(p)):
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["namespace"] == "model-forensics"


def test_overlay_config_secrets_and_ray_cluster_agree(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    text = _fleet("ConfigMap")["data"]["sidecar.yaml"]
    raw = yaml.safe_load(text)
    fleet_secret = _fleet("Secret")["stringData"]
    base_secret = [d for p in K8S.glob("*.yaml") for d in _docs(p) if d["kind"] == "Secret"]
    env = {**base_secret[0]["stringData"], **fleet_secret}
    cfg = _load(text, env, tmp_path, monkeypatch)
    _assert_fleet(cfg)
    # the patch maps every fleet secret key to the sidecar's env, from that key
    container = _fleet("StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
            if "valueFrom" in e}
    assert set(refs) == set(fleet_secret)
    assert all(r == {"name": "forensics-fleet", "key": n} for n, r in refs.items())
    assert raw["catalog"]["dsn_env"] in refs and "RAY_AUTH_TOKEN" in refs
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
    assert _fleet("StatefulSet")["spec"]["replicas"] > 1
    # the DSN's host is the catalog Service
    dsn = urllib.parse.urlsplit(fleet_secret[raw["catalog"]["dsn_env"]])
    assert dsn.hostname == _fleet("Service", "forensics-catalog")["metadata"]["name"]
    # the Ray address is KubeRay's head Service (<name>-head-svc) on the head's client port
    cluster = _fleet("RayCluster")
    ray = urllib.parse.urlsplit(cfg.jobs.ray.address)
    assert ray.hostname == f"{cluster['metadata']['name']}-head-svc"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["client"] == ray.port
    assert cluster["spec"]["rayVersion"] == _ray_pin()
    # head and workers run the sidecars' image and get the object-storage keys
    kust = _docs(FLEET / "kustomization.yaml")[0]
    image = f"{kust['images'][0]['newName']}:{kust['images'][0]['newTag']}"
    pods = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in pods:
        (c,) = group["template"]["spec"]["containers"]
        assert c["image"] == image
        assert c["envFrom"] == [{"secretRef": {"name": "forensics-fleet"}}]
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in c["env"]    # as the sidecars
        assert group["template"]["spec"]["securityContext"]["runAsNonRoot"]
    gpu = [g for g in cluster["spec"]["workerGroupSpecs"]
           if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and gpu[0]["minReplicas"] == 0       # GPU workers only while jobs ask for them
