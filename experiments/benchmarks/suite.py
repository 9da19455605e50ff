"""Every benchmark of a preset in one command, each in a process of its own, its figures as JSON.

A preset names jobs: a benchmark module of :mod:`experiments.benchmarks` and its arguments.
``cpu`` holds the commands BENCHMARKS.md quotes for its CPU figures; ``gpu`` the rows the GPU
tables need (projection, factored inference at batch 128 and 1024 in float32 and bfloat16, LRPET's
epoch measured directly, LoRITa's step); ``--only`` picks jobs by label, to split a preset over
calls of limited length. Each job runs in a fresh Python
process (a benchmark that sets ``XLA_FLAGS`` or thread limits affects no other) under
``--timeout`` seconds; its output goes to ``DIR/<label>.log``, its rows to ``DIR/<label>.json``,
and ``DIR/summary.json`` lists every job's command, exit status and wall time.

Run::

    python -m experiments.benchmarks.suite --preset gpu --out results/benchmarks/gpu
    python -m experiments.benchmarks.suite --preset gpu --only inference-b1024-bf16 --out DIR
    python -m experiments.benchmarks.suite --list
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["Job", "PRESETS", "command", "run"]


class Job(NamedTuple):
    """One benchmark run: ``python -m experiments.benchmarks.<module> *args``."""

    label: str
    module: str
    args: tuple[str, ...] = ()


_CHOICES = ("--choice", "uniform", "--choice", "latency")

PRESETS: dict[str, tuple[Job, ...]] = {
    "cpu": (
        Job("projection", "svd_projection", ("--repeats", "5")),
        Job("inference", "lowrank_inference", ("--repeats", "10", *_CHOICES, "--choice", "fastest",
                                               "--choice", "fastest-at-target")),
        Job("inference-align8", "lowrank_inference", ("--repeats", "10", "--align", "8")),
        Job("inference-resnet56-chunk16", "lowrank_inference",
            ("--repeats", "10", "--model", "resnet56", "--chunk", "16", *_CHOICES,
             "--choice", "fastest-at-target")),
        Job("lrpet-overhead", "lrpet_overhead", ("--repeats", "7")),
        Job("lorita-step-fcn", "lorita_step", ("--repeats", "20")),
        Job("lorita-step-resnet20", "lorita_step", ("--repeats", "10", "--model", "resnet20")),
        Job("sharded-projection", "sharded_projection", ()),
        Job("calibration-fcn", "calibration", ("--model", "fcn")),
        Job("calibration-resnet20", "calibration", ("--model", "resnet20")),
    ),
    "gpu": (
        Job("projection", "svd_projection", ("--repeats", "5")),
        *(Job(f"inference-b{batch}-{short}", "lowrank_inference",
              ("--repeats", "20", "--batch", str(batch), "--dtype", dtype, *_CHOICES,
               "--choice", "fastest-at-target"))
          for batch in (128, 1024) for dtype, short in (("float32", "f32"), ("bfloat16", "bf16"))),
        Job("inference-b128-align8", "lowrank_inference", ("--repeats", "20", "--align", "8")),
        Job("lrpet-overhead", "lrpet_overhead", ("--repeats", "5", "--direct")),
        Job("lorita-step-fcn", "lorita_step", ("--repeats", "50")),
        Job("lorita-step-resnet20", "lorita_step", ("--repeats", "20", "--model", "resnet20")),
    ),
}


def command(job: Job, json_path: str | Path) -> list[str]:
    """The command line of ``job``, writing its rows to ``json_path``.

    Example:
      >>> command(Job("fcn", "lorita_step", ("--repeats", "5")), "fcn.json")[1:]
      ['-m', 'experiments.benchmarks.lorita_step', '--repeats', '5', '--json', 'fcn.json']
    """
    return [sys.executable, "-m", f"experiments.benchmarks.{job.module}", *job.args,
            "--json", str(json_path)]


def run(jobs: tuple[Job, ...] | list[Job], out: str | Path, timeout: float = 600.0
        ) -> list[dict[str, Any]]:
    """Runs ``jobs`` one after the other, each in its own process; returns (and writes to
    ``out/summary.json``) one entry per job: label, command, exit status (``None`` when it ran
    past ``timeout`` seconds and was stopped) and wall seconds.

    Example::

      summary = run(PRESETS["gpu"][:1], "results/benchmarks/gpu")   # the projection only
      assert summary[0]["returncode"] == 0
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for job in jobs:
        argv = command(job, out / f"{job.label}.json")
        start = time.perf_counter()
        with open(out / f"{job.label}.log", "w") as log:
            try:
                returncode = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT,
                                            timeout=timeout, check=False).returncode
            except subprocess.TimeoutExpired:
                returncode = None
        seconds = time.perf_counter() - start
        summary.append({"label": job.label, "command": argv[1:], "returncode": returncode,
                        "seconds": round(seconds, 1)})
        print(f"{job.label}: {'timed out' if returncode is None else f'exit {returncode}'} "
              f"after {seconds:.0f} s", flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--only", action="append", metavar="LABEL",
                        help="run only the job with this label (repeatable)")
    parser.add_argument("--out", default="results/benchmarks", help="folder for logs and JSON")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per job")
    parser.add_argument("--list", action="store_true", help="print the jobs and exit")
    args = parser.parse_args(argv)
    jobs = PRESETS[args.preset]
    if args.only:
        labels = [job.label for job in jobs]
        unknown = sorted(set(args.only) - set(labels))
        if unknown:
            parser.error(f"--only: no job {unknown} in preset {args.preset!r}; its jobs: {labels}")
        jobs = tuple(job for job in jobs if job.label in args.only)
    if args.list:
        for job in jobs:
            print(job.label + ": " + " ".join(command(job, f"{job.label}.json")[1:]))
        return []
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0 seconds, got {args.timeout}")
    return run(jobs, args.out, args.timeout)


if __name__ == "__main__":
    main()
