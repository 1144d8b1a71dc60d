"""Who may call the API: bearer keys, each one an owner; loopback only when there is none.

Keys are kept only as SHA-256 digests; an owner is named by a digest of its key,
so neither Redis nor a log ever holds a key. Pure functions, no I/O but reading
the key file.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from jobs.errors import ConfigError

from .errors import Forbidden, Unauthorized

ANONYMOUS = "local"
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def owner_of(key: str) -> str:
    """The owner name of an API key (a digest, safe to store)."""
    return "k" + hashlib.sha256(b"aivvm-batch owner\0" + key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class KeyRing:
    """The accepted API keys (as digests) and the owner each one stands for."""

    entries: tuple[tuple[bytes, str], ...] = ()
    # the words after a key in its entry (its own quotas, ``batches=5``), by owner, and where each was
    quota_words: tuple[tuple[str, tuple[str, ...], str], ...] = ()

    @classmethod
    def of(cls, keys: Iterable[str]) -> KeyRing:
        unique = dict.fromkeys(k for k in keys if k)
        return cls(tuple((_digest(k), owner_of(k)) for k in unique))

    @classmethod
    def of_entries(cls, entries: Iterable[tuple[str, str]]) -> KeyRing:
        """Keys from entries ``(where, "KEY [name=value ...]")``: a key, then the quotas of its own."""
        keys: list[str] = []
        words: list[tuple[str, tuple[str, ...], str]] = []
        for where, entry in entries:
            key, *rest = entry.split()
            keys.append(key)
            if rest:
                words.append((owner_of(key), tuple(rest), where))
        return replace(cls.of(keys), quota_words=tuple(words))

    @property
    def open(self) -> bool:
        """No key configured: anyone who reaches the (loopback) server is the one owner."""
        return not self.entries

    def owner(self, authorization: str | None) -> str:
        """The owner for an ``Authorization`` header; :class:`Unauthorized` if it is not a known key."""
        if self.open:
            return ANONYMOUS
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("You didn't provide an API key. You need to provide your API key in an "
                               "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        presented = _digest(key)
        found = None
        for digest, owner in self.entries:
            if hmac.compare_digest(digest, presented):
                found = owner
        if found is None:
            raise Unauthorized("Incorrect API key provided.")
        return found


def load_keys(from_env: str | None, file: Path | None) -> KeyRing:
    """Keys from ``AIVVM_BATCH_API_KEYS`` (comma-separated) and a file (one a line, ``#`` comments);
    words after a key give it quotas of its own (``sk-… batches=5 items=100000``)."""
    entries = [(f"AIVVM_BATCH_API_KEYS, entry {n}", k.strip())
               for n, k in enumerate((from_env or "").split(","), 1) if k.strip()]
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the API keys file {file}: {exc}") from exc
        entries += [(f"{file}, line {n}", line.strip()) for n, line in enumerate(text.splitlines(), 1)
                    if line.strip() and not line.strip().startswith("#")]
        if not entries:
            raise ConfigError(f"the API keys file {file} holds no key")
    return KeyRing.of_entries(entries)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, maybe in brackets) is this machine only."""
    name = host.strip().strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_of(header: str) -> str:
    """The host of a ``Host`` header value, without its port ("" if it cannot be read)."""
    return _split("//" + header.strip()).hostname or ""


def _split(url: str) -> SplitResult:
    """``url`` split, or nothing where urlsplit refuses it (an unclosed ``[``, a host NFKC would change)."""
    try:
        return urlsplit(url)
    except ValueError:
        return SplitResult("", "", "", "", "")


def check_host(header: str | None) -> None:
    """Without keys, only requests addressed to a loopback name are served (no DNS rebinding)."""
    if not header or not is_loopback(host_of(header)):
        raise Forbidden("this server has no API key configured and answers only requests addressed "
                        "to 127.0.0.1, ::1 or localhost; set AIVVM_BATCH_API_KEYS to serve other hosts")


def check_origin(origin: str | None, host: str | None) -> None:
    """A request a browser sends from another site's page is refused (cross-site request forgery)."""
    if origin is None:
        return
    parts = _split(origin)
    if origin == "null" or not host or parts.netloc.lower() != host.strip().lower():
        raise Forbidden("cross-origin requests are not accepted")
