"""Static checks of docker-compose.yml and the Dockerfile (no Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dockerfile() -> list[tuple[str, str]]:
    lines = []
    for raw in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        raw = raw.strip()
        if raw and not raw.startswith("#"):
            instruction, _, rest = raw.partition(" ")
            lines.append((instruction.upper(), rest.strip()))
    return lines


def test_compose_has_the_services_and_the_worker_scales() -> None:
    services = compose()["services"]
    assert {"redis", "worker", "stub", "flower"} <= set(services)
    worker = services["worker"]
    assert "container_name" not in worker, "a fixed name prevents --scale worker=N"
    assert "ports" not in worker, "published ports prevent --scale worker=N"
    assert worker["build"] == "."
    assert worker["command"][0] == "worker"
    assert worker["environment"]["AIVVM_BATCH_REDIS_URL"].startswith("redis://redis:6379")
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "--appendonly" in services["redis"]["command"]


def test_compose_references_are_consistent() -> None:
    doc = compose()
    services = doc["services"]
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in doc.get("volumes", {}), f"{name}: undeclared volume {source}"
        for port in service.get("ports", []):
            assert re.fullmatch(r"127\.0\.0\.1:\d+:\d+", port), f"{name}: {port} is not loopback-only"
    flower = services["flower"]
    assert any("--broker=redis://redis:6379" in part for part in flower["command"])


def test_dockerfile_is_well_formed() -> None:
    instructions = dockerfile()
    assert instructions[0][0] == "FROM"
    known = {"FROM", "ENV", "WORKDIR", "COPY", "RUN", "USER", "ENTRYPOINT", "CMD", "ARG", "EXPOSE", "LABEL"}
    assert {i for i, _ in instructions} <= known
    for instruction, rest in instructions:
        if instruction == "COPY":
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY source {source} does not exist"
    users = [rest for i, rest in instructions if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    entry = [rest for i, rest in instructions if i == "ENTRYPOINT"]
    assert entry == ['["aivvm-batch"]']


def test_dockerfile_copies_every_package_the_project_declares() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r"packages = \[(.*?)\]", pyproject)
    assert packages is not None
    top_level = {p.strip().strip('"').split(".")[0] for p in packages.group(1).split(",")}
    copied = {rest.split()[0] for i, rest in dockerfile() if i == "COPY"}
    assert top_level <= copied


def test_compose_prometheus_scrapes_the_metrics_exporter() -> None:
    services = compose()["services"]
    exporter = services["metrics"]
    assert exporter["command"][0] == "metrics" and "ports" not in exporter, "reached by Prometheus only"
    port = exporter["command"][exporter["command"].index("--port") + 1]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    config = yaml.safe_load((ROOT / mounted["/etc/prometheus/prometheus.yml"]).read_text())
    targets = [t for job in config["scrape_configs"] for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"metrics:{port}"]
