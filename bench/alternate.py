"""`run` at once in two checkouts, alternated: what a change did, on a machine whose speed moves.

This machine's speed moves by a third within an hour (the raw client read 2,800 to 5,150 items/s
on the same row), more than most changes move `run`. Each round here runs the raw client once,
then `run` from each checkout (the order reversed every other round), all against one stand-in:
a change is judged on its pairs, never on a figure taken at another time.

    python bench/alternate.py BEFORE_DIR AFTER_DIR [--rounds 10] [--items 10000] [--concurrency 256]
                              [--latency 0] [--chunks 4]

A checkout is a directory holding the project (`git worktree add /tmp/before REV`); its modules
come first on the path of its `run`, whose interpreter is this one. Each checkout's bytecode is
written first (a process of `run` would compile what it imports otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import aivvm_run, raw_client, stand_in_process, write_prompts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkouts", nargs=2, type=Path, metavar="DIR")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=4)
    args = parser.parse_args()
    checkouts = [c.resolve() for c in args.checkouts]
    for checkout in checkouts:
        subprocess.run([sys.executable, "-m", "compileall", "-q", "jobs", "worker", "aivvm_batch"], cwd=checkout,
                       check=True)
    ratios: dict[Path, list[float]] = {c: [] for c in checkouts}
    firsts: dict[Path, list[float]] = {c: [] for c in checkouts}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = write_prompts(tmp / "alternate.jsonl", args.items, lambda i: f"alternate {i}")
        with stand_in_process(args.latency, args.chunks, tmp / "stub.log") as base:
            for round_no in range(args.rounds):
                raw = raw_client(base, args.items, args.concurrency)
                order = checkouts if round_no % 2 == 0 else checkouts[::-1]
                for number, checkout in enumerate(order):
                    fresh = tmp / f"round-{round_no}-{number}"  # a state of its own: nothing resumed
                    fresh.mkdir()
                    ours = aivvm_run(base, path, fresh, concurrency=args.concurrency, timeout=900, checkout=checkout)
                    ratios[checkout].append(ours.items_per_s / raw.items_per_s)
                    firsts[checkout].append(ours.extra["first_request_s"])
                print(f"round {round_no + 1}: raw {raw.items_per_s:,.0f} items/s; "
                      + "; ".join(f"{c.name} {ratios[c][-1]:.3f}× raw" for c in checkouts), flush=True)
    for checkout in checkouts:
        print(f"{checkout}: median {statistics.median(ratios[checkout]):.3f}× raw, mean "
              f"{statistics.mean(ratios[checkout]):.3f}×; first request at {statistics.median(firsts[checkout]):.3f} s "
              "(median)")


if __name__ == "__main__":
    main()
