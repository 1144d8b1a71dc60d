"""Which proxy, if any, the environment names for a URL: decided as requests decides it.

``HTTP(S)_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` (any case), through ``requests.utils``,
once per URL. An environment that names no proxy at all, the usual worker's, is told apart
without importing requests (a tenth of the worker's start-up).
"""

from __future__ import annotations

import os


class EnvironmentProxies:
    """The proxy of each URL, decided once (aiohttp's ``trust_env`` looks it up again on every
    request, in a thread: it measured as a third of a request's cost)."""

    LIMIT = 1024  # URLs remembered (each batch may name its own base URL)

    def __init__(self) -> None:
        self._decided: dict[str, str | None] = {}  # by whole URL: a provider posts to few

    def for_url(self, url: str) -> str | None:
        if url not in self._decided:
            if len(self._decided) >= self.LIMIT:
                self._decided.clear()
            self._decided[url] = environment_proxy(url)
        return self._decided[url]


def environment_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (not remembered)."""
    if not names_a_proxy(os.environ):
        return None
    import requests.utils

    return requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))


def names_a_proxy(environ: os._Environ[str] | dict[str, str]) -> bool:
    """Whether any variable could route a request through a proxy (urllib reads every ``*_proxy``)."""
    return any(name.lower().endswith("_proxy") and value for name, value in environ.items())
