"""Chat providers. Each streams text chunks for one request; joining happens elsewhere."""

from __future__ import annotations

from .aivvm import Aivvm
from .base import AbstractProvider, CompletionCall, StreamEnd
from .openai import OpenAI

PROVIDERS: dict[str, type[AbstractProvider]] = {"aivvm": Aivvm, "openai": OpenAI}

__all__ = ["PROVIDERS", "AbstractProvider", "Aivvm", "CompletionCall", "OpenAI", "StreamEnd"]
