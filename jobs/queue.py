"""The Celery application and the fast path that enqueues a batch's items.

The app names its task module by string, so submitting needs no worker code.
Items are enqueued as ordinary Celery task messages (built by Celery itself for
the first item of a call, then varied per item) pushed through one Redis pipeline
per chunk: submitting costs no network round trip per line.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery

from . import keys
from .config import Settings

TASK_NAME = "worker.tasks.complete_item"
WORKER_TRANSPORT = "worker.transport:Transport"
# Markers in the template message, replaced per item (batch ids are [0-9a-z] only).
_TASK_ID, _ARGSREPR, _BODY, _TAG = "@@task_id@@", "@@argsrepr@@", "@@body@@", "@@tag@@"
_MARKERS = (_TASK_ID, _ARGSREPR, _BODY, _TAG)


def celery_settings(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings``, with the delivery guarantees we rely on."""
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        # scan for messages of dead workers at every 10 s sweep, not every tenth (kombu's default)
        "unacked_restore_throttle": 1,
    }
    plain_redis = settings.redis_url.startswith("redis://")
    return {
        "broker_url": settings.redis_url,
        # named by string: submitting never imports the runtime
        "broker_transport": WORKER_TRANSPORT if plain_redis else None,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": keys.QUEUE,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "visibility_timeout": settings.visibility_timeout,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # events cost Redis publishes per task: on for Flower (AIVVM_BATCH_TASK_EVENTS=1)
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
    }


def configure(app: Celery, settings: Settings) -> None:
    """Point ``app`` at ``settings.redis_url`` (the CLI does this before any use)."""
    app.conf.update(celery_settings(settings))


class Publisher:
    """Pushes Celery task messages for items straight onto the queue's Redis list.

    The message is Celery's own (``as_task_v2``) for a template item; per item only
    the task id, the arguments and the delivery tag change, spliced in as text.
    """

    def __init__(self, client: redis.Redis, app: Celery) -> None:
        self.redis = client
        template = app.amqp.as_task_v2(_TASK_ID, TASK_NAME, args=("", 0), kwargs={})
        headers = dict(template.headers, argsrepr=_ARGSREPR)
        properties = dict(
            template.properties,
            delivery_mode=2,
            delivery_info={"exchange": keys.QUEUE, "routing_key": keys.QUEUE},
            priority=0,
            body_encoding="base64",
            delivery_tag=_TAG,
        )
        envelope = json.dumps({
            "body": _BODY,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        })
        self._embed = json.dumps(template.body[2])
        self._parts = re.split(f"({'|'.join(map(re.escape, _MARKERS))})", envelope)

    def message(self, batch_id: str, seq: int) -> str:
        task_id = f"{batch_id}:{seq}"
        body = f'[["{batch_id}", {seq}], {{}}, {self._embed}]'.encode()
        values = {
            _TASK_ID: task_id,
            _ARGSREPR: repr((batch_id, seq)),
            _BODY: base64.b64encode(body).decode(),
            _TAG: uuid.uuid4().hex,
        }
        return "".join(values.get(part, part) for part in self._parts)

    def publish(self, batch_id: str, seqs: Sequence[int], pipe: Any = None) -> None:
        if not seqs:
            return
        own = pipe is None
        pipe = self.redis.pipeline(transaction=False) if own else pipe
        pipe.lpush(keys.QUEUE, *(self.message(batch_id, s) for s in seqs))
        if own:
            pipe.execute()

    def purge(self) -> None:
        """Drop every queued and unacknowledged message (private Redis only)."""
        self.redis.delete(keys.QUEUE, "unacked", "unacked_index")


app = Celery("aivvm_batch", include=["worker.tasks"])
# Read the environment only when the configuration is first needed (plain `celery -A`
# workers), so that a bad variable is reported by whoever uses it, not at import.
app.add_defaults(lambda: celery_settings(Settings.from_env()))
