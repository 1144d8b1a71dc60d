"""What ``run`` checks before it starts Redis or pays for anything.

The output path, the input (read once if it is not a regular file), its format,
the base URL and the settings: a mistake in any of them is one line and exit 2,
at no cost.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from jobs.config import Settings
from jobs.errors import ConfigError
from jobs.inputs import check_input, read_head, spool
from jobs.lines import open_input
from jobs.output import check_output, is_stdio
from worker.providers import PROVIDERS
from worker.providers.checks import check_base_url

from .options import check_redis_url
from .plan import RunPlan
from .progress import Progress


@dataclass(frozen=True)
class Checked:
    """The input as ``run`` will read it."""

    path: Path
    # what the previous run of the same input is found by (see BatchStore.run_batch)
    source_key: str
    # how to name the input to the user
    display: str


def preflight(plan: RunPlan, progress: Progress) -> Checked:
    Settings.from_env()
    if plan.redis_url is not None:
        check_redis_url(plan.redis_url)
    check_output(plan.output, None if is_stdio(plan.file) else plan.file)
    if not plan.use_stub:
        _check_base_url(plan, progress)
    display = "standard input" if is_stdio(plan.file) else str(plan.file)
    if is_stdio(plan.file) and sys.stdin.isatty():
        progress.note("aivvm-batch: reading prompts from the terminal, one JSON object a line; "
                      "end with Ctrl-D")
    check_state_dir(plan.state_dir)
    spool_dir = plan.state_dir / "spool"
    path = spool(plan.file, spool_dir)
    # the host too: on a shared Redis, another machine's file of the same name is another input
    if is_stdio(plan.file) or path != Path(plan.file):
        path = _by_content(path, spool_dir)
        key = f"{socket.gethostname()}:sha256:{path.stem}"
    else:
        key = f"{socket.gethostname()}:{Path(plan.file).resolve()}"
    check_input(path, display)
    if not read_head(path, 4096).strip():
        progress.note(f"aivvm-batch: warning: {display} is empty: there is nothing to run")
    return Checked(path, key, display)


def check_state_dir(state_dir: Path) -> None:
    """The state directory exists or can be made, as a directory (its Redis, logs and spool go there)."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--state-dir {state_dir}: cannot make it a directory: "
                          f"{exc.strerror or exc}") from None


def _by_content(copy: Path, directory: Path) -> Path:
    """Name a spooled copy by a digest of its content, so that the same input is one file."""
    digest = hashlib.sha256()
    with open_input(copy) as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    named = directory / f"{digest.hexdigest()}.jsonl"
    os.replace(copy, named)
    return named


def prune_spool(state_dir: Path, keep: set[str]) -> None:
    """Remove spooled inputs that no batch in ``keep`` (their sources) reads any more."""
    for path in (state_dir / "spool").glob("*"):
        if str(path) not in keep:
            path.unlink(missing_ok=True)


def _check_base_url(plan: RunPlan, progress: Progress) -> None:
    """The URL the first provider will use: ``--base-url``, else its variable in our environment."""
    provider = PROVIDERS[plan.options.providers()[0]]
    given = plan.options.base_url
    url = given or os.environ.get(provider.base_url_variable)
    if not url:
        return
    origin = "--base-url" if given else provider.base_url_variable
    try:
        warning = check_base_url(provider.name, url)
    except ValueError as exc:
        raise ConfigError(f"{origin} {url}: {exc}") from None
    if warning:
        progress.note(f"aivvm-batch: warning: {origin} {url}: {warning}")

