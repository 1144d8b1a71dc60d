"""``python -m worker``: the Celery worker of ``celery -A worker.tasks worker --pool threads``,
started without Celery's command line (its click and REPL imports cost a third of a second of
start-up). ``--concurrency`` is the requests in flight in this process, as for ``aivvm-batch
worker``; the Redis URL comes from the environment.

``--fork-from-stdin`` is how ``run`` starts its workers (aivvm_batch.workers): import
everything once, while ``run`` starts its Redis; then read one JSON object on standard input,
``{"env": {...}, "workers": [{"concurrency": N, "hostname": H, "log": PATH}, ...]}``, fork one
worker process per entry, print their process ids (a JSON list) and exit. ``run``, a child
subreaper, adopts them. N workers so cost one import (a third of a second of CPU) instead of
N, and share its memory. At the end of input instead of the object, exit.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import os
import signal
import sys
import traceback
from typing import Any, NoReturn

# what the worker's boot imports lazily: imported before forking, once for every worker
BOOT_MODULES = ("celery.apps.worker", "celery.worker.consumer", "celery.worker.strategy", "celery.app.trace",
                "celery.concurrency.thread", "celery.backends.base", "celery.events.dispatcher",
                "celery.events.receiver", "celery.utils.debug", "kombu.pidbox", "kombu.matcher",
                "worker.transport", "uvloop")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, help="requests in flight in this process")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--hostname", default=None)
    parser.add_argument("--fork-from-stdin", action="store_true",
                        help="after the imports, fork the workers named on standard input (see above)")
    args = parser.parse_args(argv)
    if not args.fork_from_stdin and (args.concurrency is None or args.concurrency < 1):
        parser.error("--concurrency must be at least 1")
    # no collection while importing (a tenth of the start-up, the project's first module included);
    # the runtime then sets the collector for work (worker.runtime.collect_for_work)
    gc.disable()
    import worker.tasks  # noqa: F401 - registers the task and the runtime's bootsteps

    if not args.fork_from_stdin:
        _serve(args.concurrency, args.hostname, args.loglevel)
    for module in BOOT_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:  # another Celery's layout: the boot imports what it needs itself
            pass
    line = sys.stdin.readline()
    if not line.strip():  # whoever started us ended before it needed us
        os._exit(0)
    order = json.loads(line)
    # nothing read the environment yet: the configuration is read on first use
    os.environ.update({str(k): str(v) for k, v in order["env"].items()})
    parent, forker = os.getppid(), os.getpid()
    gc.freeze()  # the imported heap stays shared with the workers (no collection writes to it)
    pids: list[int] = []
    try:
        for spec in order["workers"]:
            pid = os.fork()
            if pid == 0:
                _become_worker(spec, parent, forker, args.loglevel)
            pids.append(pid)
    except OSError:  # no more processes: none of them works, rather than some run unseen by run
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        raise
    sys.stdout.write(json.dumps(pids) + "\n")
    sys.stdout.flush()
    os._exit(0)


def _become_worker(spec: dict[str, Any], parent: int, forker: int, loglevel: str) -> NoReturn:
    """In a forked child: its own log and input, adopted by ``parent``, then the worker."""
    from .lineage import adopted_by

    try:
        log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        nothing = os.open(os.devnull, os.O_RDONLY)
        os.dup2(nothing, 0)
        os.close(nothing)
        if not adopted_by(parent, forker):  # run ended meanwhile
            os._exit(0)
        concurrency, hostname = int(spec["concurrency"]), spec.get("hostname")
        from celery.utils.nodenames import host_format

        print(f"worker {host_format(hostname) if hostname else os.getpid()}: process {os.getpid()}, "
              f"{concurrency} requests in flight", file=sys.stderr, flush=True)
        _serve(concurrency, hostname, loglevel)
    except SystemExit as stop:
        os._exit(stop.code if isinstance(stop.code, int) else int(stop.code is not None))
    except BaseException:  # noqa: BLE001 - a forked child never returns into its parent's code
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def _serve(concurrency: int, hostname: str | None, loglevel: str) -> NoReturn:
    from jobs import keys
    from jobs.config import ENV_PREFIX
    from jobs.queue import app, celery_threads

    os.environ[f"{ENV_PREFIX}CONCURRENCY"] = str(concurrency)  # read by the runtime it builds
    node = app.Worker(pool_cls="threads", concurrency=celery_threads(concurrency),
                      loglevel=loglevel.upper(), queues=[keys.QUEUE], hostname=hostname,
                      without_gossip=True, without_mingle=True, quiet=True,
                      # Celery's heartbeat is a publish on the consumer's thread every 2 s, for Flower
                      # (status reads the workers' own heartbeats)
                      without_heartbeat=not app.conf.worker_send_task_events)
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
