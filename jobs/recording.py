"""Recording what items came to: their final results, the calls paid late, failed attempts' errors.

Every count that must happen once happens inside a script (RECORD, COUNT_LATE), so a
task that runs twice cannot record twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from . import keys, scripts
from .cache import cache_key
from .cache import entry as cache_entry
from .connection import translated
from .observations import observe
from .records import BatchOptions, ItemRequest, ItemResult, Usage


class Recorded(IntEnum):
    """What recording an item's result did (the RECORD script's answer per item)."""

    NOT = 0  # the batch is gone, or the item has its result already (this one, sent again)
    RECORDED = 1
    LATE = 2  # paid, not the final result (the claim had passed on): counted in usage, as late


class ResultRecorder:
    def __init__(self, client: redis.Redis, result_ttl: int) -> None:
        self.redis = client
        self.result_ttl = result_ttl
        self._record = client.register_script(scripts.RECORD)
        self._count_late = client.register_script(scripts.COUNT_LATE)
        # the scripts of every item's path, that a worker loads at its start (BatchStore.load_scripts)
        self.item_path_scripts: tuple[Script, ...] = (self._record, self._count_late)

    @translated
    def record(self, batch_id: str, seq: int, result: ItemResult) -> bool:
        """Record the final result of an item; False if one was already recorded."""
        return self.record_many(batch_id, [(seq, result)])[0] is Recorded.RECORDED

    @translated
    def record_many(self, batch_id: str, results: Sequence[tuple[int, ItemResult]],
                    tokens: Sequence[str] | None = None) -> list[Recorded]:
        """Record the final results of many items in one script; per item, what it did.

        With ``tokens`` (the claims the results were made under), a result whose claim has
        passed to another token, or whose item has another result, is not recorded but
        counted as late (:class:`Recorded`); without, the first result wins and that is all.
        """
        if not results:
            return []
        # EVALSHA put in the pipeline by hand: a script registered with a pipeline makes redis-py ask
        # SCRIPT EXISTS first, a round trip more (0.4 s a flush on a link of 200 ms each way)
        record_keys, args = self._record_arguments(batch_id, results, tokens)
        pipe = self.redis.pipeline(transaction=False)
        pipe.evalsha(self._record.sha, len(record_keys), *record_keys, *args)
        observe(pipe, [result for _, result in results])
        replies = pipe.execute(raise_on_error=False)
        recorded = replies[0]
        if isinstance(recorded, NoScriptError):  # a Redis that lost its scripts (restarted): loaded again
            recorded = self._record(keys=record_keys, args=args)
        elif isinstance(recorded, Exception):
            raise recorded
        for reply in replies[1:]:
            if isinstance(reply, Exception):
                raise reply
        return [Recorded(int(r)) for r in recorded]

    def record_in(self, pipe: Any, batch_id: str, results: Sequence[tuple[int, ItemResult]],
                  tokens: Sequence[str] | None = None) -> Any:
        """The RECORD script run on ``pipe`` (a pipeline, whose reply comes with it), or at once if None."""
        record_keys, args = self._record_arguments(batch_id, results, tokens)
        return self._record(keys=record_keys, args=args, client=pipe)

    def _record_arguments(self, batch_id: str, results: Sequence[tuple[int, ItemResult]],
                          tokens: Sequence[str] | None) -> tuple[list[str], list[Any]]:
        args: list[Any] = [self.result_ttl]
        for position, (seq, result) in enumerate(results):
            usage = None if result.cached else result.usage  # a reused answer costs the batch nothing
            paid = f"{usage.prompt_tokens} {usage.completion_tokens} {int(usage.estimated)}" if usage else "0 0 0"
            token = tokens[position] if tokens else ""
            args += [f"{seq} {result.status.value} {paid} {max(1, result.attempts)} {token}", result.to_json()]
        return [*keys.batch_keys(batch_id), *(keys.claim(batch_id, seq) for seq, _ in results)], args

    @translated
    def count_late(self, batch_id: str, calls: Sequence[tuple[int, Usage, int, str]]) -> int:
        """Count calls paid for items ``(seq, their usage, how many calls, the claim's token)`` that
        another result answers (a run whose claim passed on); once per token."""
        if not calls:
            return 0
        args: list[Any] = []
        for seq, usage, count, token in calls:
            args += [seq, usage.prompt_tokens, usage.completion_tokens, int(usage.estimated), count, token]
        return int(self._count_late(keys=keys.batch_keys(batch_id), args=args))

    @translated
    def note_attempt_error(self, batch_id: str, text: str) -> None:
        """Count a failed attempt's error (``"<type>: <message>"``) for ``status`` and progress."""
        self.note_attempt_errors([(batch_id, text)])

    @translated
    def note_attempt_errors(self, errors: Sequence[tuple[str, str]]) -> None:
        """Count many failed attempts' errors ``(batch_id, text)`` in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for batch_id, text in errors:
            pipe.hincrby(keys.errors(batch_id), text[:200], 1)
        for batch_id in {batch_id for batch_id, _ in errors}:
            pipe.expire(keys.errors(batch_id), self.result_ttl)
        pipe.execute()

    @translated
    def keep_answers(self, answers: Sequence[tuple[BatchOptions, ItemRequest, ItemResult]], ttl: int) -> None:
        """Keep ``ok`` results in the cache for later batches that ask the same (jobs/cache.py), in
        one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for options, request, result in answers:
            text = cache_entry(result, options)
            if text is not None:
                pipe.set(keys.cache(cache_key(options, request)), text, ex=max(1, ttl))
        pipe.execute()
