"""Base URLs: the check a user's URL gets before anything runs, and the form URLs are compared in.

Pure: no I/O, no environment. Each protocol's path comes from its provider class.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def check_base_url(provider_name: str, url: str) -> str | None:
    """Raise ``ValueError`` (one line, without the URL) if ``url`` cannot be a base URL.

    Returns a warning when it looks wrong but may work: it ends in the path the
    protocol appends itself (Aivvm ``/api/chat``, OpenAI ``/chat/completions``).
    """
    # the registry, imported here because the providers import this module
    from . import PROVIDERS

    if provider_name not in PROVIDERS:
        raise ValueError(f"unknown provider {provider_name!r}")
    return check_url(url, PROVIDERS[provider_name].path)


def check_url(url: str, suffix: str) -> str | None:
    """:func:`check_base_url` for a protocol that appends ``suffix`` to its base URL."""
    scheme = _SCHEME.match(url)
    if scheme is None:
        raise ValueError(f"no scheme: write http://{url} or https://{url}")
    if scheme.group(1).lower() not in DEFAULT_PORTS:
        raise ValueError(f"the scheme {scheme.group(1)}:// is not supported: use http:// or https://")
    parts = urlsplit(url)
    try:
        parts.port
    except ValueError:
        raise ValueError("the port is not a number from 0 to 65535") from None
    if not parts.hostname:
        raise ValueError("no host: write it as http://host:port")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError("a base URL has no query (?...) or fragment (#...)")
    path = parts.path.rstrip("/")
    if path.endswith(suffix):
        shorter = url[: url.rstrip("/").rfind(suffix)]
        return (f"the base URL ends in {suffix}, which aivvm-batch appends itself; "
                f"use {shorter or 'http://host:port'}")
    return None


def normal_form(url: str) -> tuple[str, str, str, int, str] | None:
    """``(scheme, userinfo, host, port, path)`` to compare base URLs by, or None if not a URL.

    Scheme and host lower-cased, the default port made explicit, the path without its
    trailing slash. Two base URLs are the same only if these are equal.
    """
    url = url.strip()
    if _SCHEME.match(url) is None:
        return None
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.query or parts.fragment:
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    return (scheme, userinfo, parts.hostname.lower(), port if port is not None else DEFAULT_PORTS[scheme],
            parts.path.rstrip("/"))
