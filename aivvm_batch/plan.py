"""What one ``aivvm-batch run`` is asked to do: checked by :mod:`.preflight`, carried out by :mod:`.runner`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jobs.formats import ResultFormat
from jobs.records import BatchOptions, RequestDefaults


@dataclass(frozen=True)
class RunPlan:
    file: str
    output: str
    options: BatchOptions
    defaults: RequestDefaults = RequestDefaults()
    redis_url: str | None = None
    state_dir: Path = Path(".aivvm-batch")
    use_stub: bool = False
    fmt: ResultFormat = ResultFormat.NATIVE
    fresh: bool = False
