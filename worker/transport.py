"""kombu's Redis transport, with a worker that survives a Redis restart.

When the broker connection drops, Celery releases it and kombu closes its
channels; closing tries to requeue this worker's unacknowledged messages through
a connection that Celery has already discarded, and the AttributeError it meets
is not a connection error, so it kills the worker (kombu 5.7). Here that requeue
is skipped instead: the messages stay in Redis's unacked set and are restored by
the sweep after the visibility timeout, like those of a worker that died.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis

logger = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):
    def restore_unacked(self, client: Any = None) -> None:
        try:
            super().restore_unacked(client)
        except AttributeError:
            logger.warning("broker connection already gone: unacknowledged messages will be "
                           "restored after the visibility timeout")


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel
