"""The Celery application and the fast path that enqueues a batch's items.

The app names its task module by string, so submitting needs no worker code.
Items are enqueued as ordinary Celery task messages (built by Celery itself for
the first item of a call, then varied per item) pushed through one Redis pipeline
per chunk: submitting costs no network round trip per line.
"""

from __future__ import annotations

import base64
import copy
import json
import uuid
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery

from . import keys
from .config import Settings

TASK_NAME = "worker.tasks.complete_item"


def celery_settings(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings``, with the delivery guarantees we rely on."""
    transport = {"visibility_timeout": settings.visibility_timeout}
    return {
        "broker_url": settings.redis_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": keys.QUEUE,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "visibility_timeout": settings.visibility_timeout,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_send_task_events": True,
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
    }


def configure(app: Celery, settings: Settings) -> None:
    """Point ``app`` at ``settings.redis_url`` (the CLI does this before any use)."""
    app.conf.update(celery_settings(settings))


class Publisher:
    """Pushes Celery task messages for items straight onto the queue's Redis list."""

    def __init__(self, client: redis.Redis, app: Celery) -> None:
        self.redis = client
        template = app.amqp.as_task_v2("template", TASK_NAME, args=("", 0), kwargs={})
        self._headers = dict(template.headers)
        self._properties = dict(template.properties)
        self._embed = template.body[2]

    def message(self, batch_id: str, seq: int) -> str:
        task_id = f"{batch_id}:{seq}"
        headers = copy.copy(self._headers)
        headers.update(id=task_id, root_id=task_id, argsrepr=repr((batch_id, seq)))
        body = json.dumps([[batch_id, seq], {}, self._embed]).encode()
        properties = dict(self._properties)
        properties.update(
            correlation_id=task_id,
            delivery_mode=2,
            delivery_info={"exchange": keys.QUEUE, "routing_key": keys.QUEUE},
            priority=0,
            body_encoding="base64",
            delivery_tag=uuid.uuid4().hex,
        )
        return json.dumps({
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        })

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
