"""Run a train.py grid in several processes side by side, each with its share of the cores.

    python scripts/run_grid.py --jobs 2 --deal experiment=table3_cpu_lora,table3_cpu_ts_lora -- \
        task=glue/sst2,glue/mrpc seed=1,2,3 ++skip_existing=true

The values of the ``--deal`` override are dealt round-robin to ``--jobs`` processes, each
``train.py -m <key>=<its share> <overrides>`` with ``OMP_NUM_THREADS = cores / jobs``. On this project's
2-core machine two one-thread runs side by side finish 1.3x the work of one two-thread run in the same
time (small models do not keep two threads busy; docs/small-scale.md). Each process logs to
``<log dir>/job<i>.log``; the exit status is the first non-zero status of a job, after all have finished,
so one failure does not hide behind a finished table. With ``--jobs 1`` it is one ``train.py -m`` in the
foreground.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def deal(items: list[str], jobs: int) -> list[list[str]]:
    """Round-robin shares, none empty: 6 experiments over 2 jobs -> [0, 2, 4], [1, 3, 5]."""
    shares = [items[i::jobs] for i in range(jobs)]
    return [share for share in shares if share]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1, help="processes side by side (default 1)")
    parser.add_argument("--deal", required=True, help="the override whose values are shared out: key=v1,v2,...")
    parser.add_argument("--log-dir", type=Path, default=ROOT / "multirun" / "grid-logs")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, after --")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1 (got {args.jobs})")
    key, _, values = args.deal.partition("=")
    values = [v for v in values.split(",") if v]
    if not key or not values:
        parser.error(f"--deal takes key=v1,v2,... (got {args.deal!r})")
    command = [sys.executable, str(ROOT / "train.py"), "-m"]
    if args.jobs == 1:
        return subprocess.call([*command, f"{key}={','.join(values)}", *args.overrides], cwd=ROOT)

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    args.log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
    running = []
    for index, share in enumerate(deal(values, args.jobs)):
        log = args.log_dir / f"job{index}.log"
        print(f"job {index}: {key}={','.join(share)} ({threads} thread(s)) -> {log}", flush=True)
        with open(log, "w") as out:
            # each job its own Hydra sweep directory: jobs started in the same second would share one
            sweep_dir = f"hydra.sweep.dir=multirun/{stamp}-job{index}"
            # a progress bar redrawn into a log file is megabytes of carriage returns
            quiet = "trainer.enable_progress_bar=false"
            full = [*command, f"{key}={','.join(share)}", *args.overrides, sweep_dir, quiet]
            running.append((index, subprocess.Popen(full, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)))
    statuses = []
    for index, process in running:
        status = process.wait()
        statuses.append(status)
        print(f"job {index} finished with status {status} after {time.monotonic() - started:.0f} s", flush=True)
    return next((s for s in statuses if s != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
