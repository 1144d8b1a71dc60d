"""Chat providers. Each streams text chunks for one request; joining happens elsewhere."""

from __future__ import annotations

from .aivvm import Aivvm
from .base import AbstractProvider
from .call import CompletionCall, StreamEnd
from .checks import check_base_url
from .openai import OpenAI

# The one registry, by each class's name; each class names its path, base-URL and API-key variables.
PROVIDERS: dict[str, type[AbstractProvider]] = {cls.name: cls for cls in (Aivvm, OpenAI)}

__all__ = ["PROVIDERS", "AbstractProvider", "Aivvm", "CompletionCall", "OpenAI", "StreamEnd",
           "check_base_url"]
