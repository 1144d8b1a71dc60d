"""The locks agree with pyproject.toml: every declared dependency is pinned there, hashed, to a
version its range allows (`make lock` writes them again after a change of the ranges)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)(?:\s*;\s*([^\\]+?))?\s*\\?$")


def pins(lock: str) -> dict[str, list[tuple[str, str | None]]]:
    found: dict[str, list[tuple[str, str | None]]] = {}
    for line in (ROOT / lock).read_text().splitlines():
        match = PIN.match(line)
        if match:
            found.setdefault(match[1].lower().replace("_", "-"), []).append((match[2], match[3]))
    return found


def declared(extra: str | None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    if extra:
        requirements += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return requirements


@pytest.mark.parametrize("lock, extra", [("requirements.lock", None), ("requirements-test.lock", "test")])
def test_every_dependency_is_pinned_within_its_range_and_hashed(lock: str, extra: str | None) -> None:
    locked = pins(lock)
    for requirement in declared(extra):
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = requirement.name.lower().replace("_", "-")
        here = [version for version, marker in locked.get(name, [])
                if marker is None or Marker(marker).evaluate()]
        assert len(here) == 1, f"{lock}: {requirement.name} is not pinned for this Python (`make lock`)"
        assert requirement.specifier.contains(here[0], prereleases=True), \
            f"{lock}: {requirement.name}=={here[0]} is outside {requirement.specifier} (`make lock`)"
    text = (ROOT / lock).read_text()
    assert text.count("==") <= text.count("--hash=sha256:")


def test_the_kombu_internals_we_subclass_are_bounded() -> None:
    bounded = {r.name: r.specifier for r in declared(None)}
    for name in ("kombu", "celery"):
        assert any(spec.operator == "<" for spec in bounded[name]), f"{name} needs an upper bound"
