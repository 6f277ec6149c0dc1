"""Wall time of a local pipeline run, split into orchestration overhead and stage work.

    python benchmarks/pipeline_overhead.py --profile smoke [--data DIR --dataset jaffe] [--max-folds N]

Stage work is the union of the intervals in which at least one task runs, as
KFP's local runner logs them ("Executing task" .. "finished"). Orchestration
overhead is the rest of the wall time: the runner's own bookkeeping between
tasks. Each task also pays its interpreter start and imports, which the runner
cannot avoid; that cost is measured separately and reported beside it, as the
share of stage work it takes. Without --data the synthetic demo set is made.
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK = re.compile(r"(Executing task|Task) '?(\x1b\[[0-9;]*m)?'?([\w-]+)")


class TaskTimes(logging.Handler):
    """Collects (task, start, end) from the local runner's log lines."""

    def __init__(self):
        super().__init__()
        self.open: dict[str, list[float]] = {}
        self.intervals: list[tuple[str, float, float]] = []

    def emit(self, record):
        message = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())
        if message.startswith("Executing task "):
            self.open.setdefault(message.split("'")[1], []).append(record.created)
        elif message.startswith("Task ") and "finished with status" in message:
            name = message.split("'")[1]
            if self.open.get(name):
                self.intervals.append((name, self.open[name].pop(0), record.created))


def union_seconds(intervals) -> float:
    total, end = 0.0, float("-inf")
    for _, start, stop in sorted(intervals, key=lambda i: i[1]):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def import_seconds(modules: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {modules}"], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--data", default=None)
    parser.add_argument("--dataset", default="jaffe")
    parser.add_argument("--max-folds", type=int, default=0)
    parser.add_argument("--network", default="el")
    args = parser.parse_args()

    from ferpipe.demo.synthetic import make_demo_dataset
    from pipelines.local_run import run_locally

    work = Path(tempfile.mkdtemp(prefix="ferpipe-bench-"))
    data = args.data or str(make_demo_dataset(work / "demo"))
    handler = TaskTimes()
    logging.getLogger().addHandler(handler)
    started = time.perf_counter()
    run = run_locally(data, args.dataset, work / "run", network=args.network, profile=args.profile,
                      max_folds=args.max_folds)
    wall = time.perf_counter() - started
    busy = union_seconds(handler.intervals)
    light = import_seconds("kfp.dsl.executor_main, ferpipe.preprocess.runner")
    heavy = import_seconds("kfp.dsl.executor_main, ferpipe.crossval.steps")
    tasks = [name for name, *_ in handler.intervals]
    tf_tasks = sum(name in ("train-member", "predict-fold", "aggregate-results") for name in tasks)
    startup = light * (len(tasks) - tf_tasks) + heavy * tf_tasks

    print(f"profile {args.profile}, {len(tasks)} tasks, data {data}")
    print(f"wall time:                 {wall:8.1f} s")
    print(f"stage work (tasks running): {busy:7.1f} s")
    print(f"orchestration overhead:    {wall - busy:8.1f} s  ({100 * (wall - busy) / wall:.1f}% of wall; target < 10% for demo)")
    print(f"  of which inside tasks, interpreter start + imports: ~{startup:.0f} s "
          f"({light:.1f} s light, {heavy:.1f} s with TensorFlow, x tasks; counted in stage work above)")
    by_task: dict[str, float] = {}
    for name, start, stop in handler.intervals:
        by_task[name] = by_task.get(name, 0.0) + stop - start
    for name, seconds in sorted(by_task.items(), key=lambda kv: -kv[1]):
        print(f"  {name:20} {seconds:8.1f} s  ({tasks.count(name)} runs)")
    print(f"results: {run.results}")


if __name__ == "__main__":
    main()
