"""A circuit breaker per provider scope, in one worker: is the provider out of this worker's reach?

One worker can lose its path to a provider (a cut link, a firewall, a proxy that is down)
while another still reaches it. A call that fails before any answer (connection refused,
connect timeout) says so; after :data:`OPEN_AFTER` of them in a row the breaker of that
scope opens: this worker hands the scope's items to the queue at once, where a healthy
worker takes them, instead of retrying them itself (retries that kept renewing their claims
failed 25 items while a healthy worker sat idle). It closes at the first call that gets an
answer. Pure: the caller gives the monotonic time.
"""

from __future__ import annotations

from dataclasses import dataclass

OPEN_AFTER = 2  # failures before any answer, in a row
# while open, a call is still tried this often (a probe: the path may have come back)
PROBE_EVERY = 10.0


@dataclass
class _Scope:
    failures: int = 0
    down_since: float | None = None  # the first failure of the run
    probed: float = 0.0


class Breaker:
    """Reachability of each scope (a provider at a base URL) from this worker."""

    def __init__(self) -> None:
        self._scopes: dict[str, _Scope] = {}

    def failed(self, scope: str, now: float) -> None:
        """A call failed before any answer."""
        state = self._scopes.setdefault(scope, _Scope())
        state.failures += 1
        if state.down_since is None:
            state.down_since = now
        state.probed = now

    def answered(self, scope: str) -> None:
        """A call got an answer (any status): the path works."""
        self._scopes.pop(scope, None)

    def is_open(self, scope: str, now: float) -> bool:
        """Whether this worker should leave the scope's items to others now (False once every
        :data:`PROBE_EVERY` seconds: that call probes the path)."""
        state = self._scopes.get(scope)
        if state is None or state.failures < OPEN_AFTER:
            return False
        if now - state.probed >= PROBE_EVERY:
            state.probed = now
            return False
        return True

    def note(self, now: float) -> str:
        """What a heartbeat says: the scope out of reach the longest, and since when."""
        down = [(state.down_since, scope) for scope, state in self._scopes.items()
                if state.failures >= OPEN_AFTER and state.down_since is not None]
        if not down:
            return ""
        since, scope = min(down)
        return f"provider unreachable for {now - since:.0f} s ({scope})"


__all__ = ["OPEN_AFTER", "PROBE_EVERY", "Breaker"]
