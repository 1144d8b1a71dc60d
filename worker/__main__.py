"""``python -m worker``: the Celery worker of ``celery -A worker.tasks worker --pool threads``,
started without Celery's command line (its click and REPL imports cost a third of a second of
start-up): ``run`` starts its workers this way. ``--concurrency`` is the requests in flight
in this process, as for ``aivvm-batch worker``; the Redis URL comes from the environment, or
with ``--settings-from-stdin`` from ``run`` once its Redis is up (aivvm_batch.workers).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--concurrency", type=int, required=True, help="requests in flight in this process")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--hostname", default=None)
    parser.add_argument("--settings-from-stdin", action="store_true",
                        help="after the imports, wait for one JSON object of environment settings (the Redis "
                             "URL among them) on standard input; at its end instead, exit")
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    # no collection while importing (a tenth of the start-up, the project's first module included);
    # the runtime then sets the collector for work (worker.runtime.collect_for_work)
    gc.disable()
    from jobs import keys
    from jobs.config import ENV_PREFIX
    from jobs.queue import app, celery_threads

    os.environ[f"{ENV_PREFIX}CONCURRENCY"] = str(args.concurrency)  # read by the runtime it builds
    import worker.tasks  # noqa: F401 - registers the task and the runtime's bootsteps

    if args.settings_from_stdin:
        line = sys.stdin.readline()
        if not line.strip():  # whoever started us ended before it needed us
            os._exit(0)
        # nothing read the environment yet: the configuration is read on first use
        os.environ.update({str(k): str(v) for k, v in json.loads(line).items()})

    node = app.Worker(pool_cls="threads", concurrency=celery_threads(args.concurrency),
                      loglevel=args.loglevel.upper(), queues=[keys.QUEUE], hostname=args.hostname,
                      without_gossip=True, without_mingle=True, quiet=True)
    gc.enable()
    node.start()
    # Celery has stopped and acknowledged its work: exit at once, with Celery's code (2 when
    # check_redis refused the Redis), without the interpreter's teardown (joining idle
    # threads, freeing every module: a tenth of a second that ``run`` waits for)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(node.exitcode or 0))


if __name__ == "__main__":
    main()
