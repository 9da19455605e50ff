"""What changes a training run's numbers: the same run on this machine, with XLA capped to
another instruction set, and on fewer cores, each in a fresh process.

A run is one LoRITa model of :mod:`experiments.evidence` (its ``jaxlr`` arm: FCN-10 of width 256,
N factors per kernel, the default preset's learning rate and schedule) trained on one seed's split
of real MNIST and measured by the evidence's own endpoints at its final epoch. Each variant runs in
a new Python process:

* ``this machine``, twice: the same command must give the same weights, bit for bit;
* ``XLA for ISA``: ``XLA_FLAGS=--xla_cpu_max_isa=ISA`` (e.g. AVX2, a processor without AVX-512);
* ``k cores``: the process pinned to ``k`` of the cores (``os.sched_setaffinity``) before jax
  starts: XLA sizes its CPU thread pool by them, and a matrix product split over other threads
  sums in another order.

The table gives, per variant, a digest of the trained weights, and each endpoint with its change
from the first run. Run::

    python -m experiments.reproducibility [--epochs 100] [--seed 1] [--depth 3] [--decay 1e-3]
        [--isa AVX2] [--cores 1] [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ENDPOINT_KEYS", "block", "main", "measure", "run", "run_variant"]

ROOT = Path(__file__).resolve().parent.parent
ENDPOINT_KEYS = ("validation", "test", "energy", "budget@0.005", "drop@0.05")


def measure(epochs: int, seed: int, depth: int, decay: float, output: Path) -> dict[str, Any]:
    """Trains and measures one run in this process (what each variant's process does)."""
    import jax
    import numpy as np

    from experiments import evidence, machine, presets
    from experiments.results import Results

    config = dataclasses.replace(
        evidence.PRESETS["default"],
        lorita_train=dataclasses.replace(evidence.PRESETS["default"].lorita_train,
                                         epochs=epochs))
    arm = evidence.ARMS["jaxlr"]
    data = presets.load_data(config, seed)
    fit = evidence.fit_lorita(config, arm, data, depth, decay, seed, Results(output), False)
    numbers = evidence.measure(config, arm, fit["model"], fit["final"], data)
    leaves = jax.tree.leaves(fit["final"])
    weights = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in leaves)).hexdigest()
    return {"machine": machine.describe(), "weights": weights[:16],
            **{key: numbers[key] for key in ENDPOINT_KEYS}}


def run_variant(epochs: int, seed: int, depth: int, decay: float, *, isa: str | None = None,
                cores: int | None = None) -> dict[str, Any]:
    """One run in a new process: this machine's settings, or XLA capped to ``isa``, or pinned to
    the first ``cores`` of the cores this process may use."""
    env = dict(os.environ)
    if isa is not None:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_cpu_max_isa={isa}".strip()
    pinned = None
    if cores is not None:
        available = sorted(os.sched_getaffinity(0))
        if not 1 <= cores <= len(available):
            raise ValueError(f"cores must be in [1, {len(available)}], got {cores}.")
        pinned = available[:cores]
    with tempfile.TemporaryDirectory() as output:
        script = ("import json, os, sys; from pathlib import Path\n"
                  "pinned = json.loads(sys.argv[6])\n"
                  "if pinned: os.sched_setaffinity(0, pinned)\n"
                  "from experiments import reproducibility as r\n"
                  "print('RESULT ' + json.dumps(r.measure(int(sys.argv[1]), int(sys.argv[2]), "
                  "int(sys.argv[3]), float(sys.argv[4]), Path(sys.argv[5]))))\n")
        done = subprocess.run([sys.executable, "-c", script, str(epochs), str(seed), str(depth),
                               repr(decay), output, json.dumps(pinned)], cwd=ROOT, env=env,
                              text=True, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"the run (isa={isa}, cores={cores}) failed:\n"
                           f"{(done.stdout + done.stderr)[-4000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def block(rows: Sequence[Mapping[str, Any]], epochs: int, seed: int, depth: int,
          decay: float) -> str:
    """The markdown table of the variants (the first is the reference of every change)."""
    from experiments.results import Column, markdown_table

    first = rows[0]
    table = [{"variant": r["variant"], "weights": f"`{r['weights']}`",
              **{key: f"{r[key]:.4f}" + ("" if r is first else f" ({r[key] - first[key]:+.4f})")
                 for key in ENDPOINT_KEYS}} for r in rows]
    command = (f"python -m experiments.reproducibility --epochs {epochs} --seed {seed} "
               f"--depth {depth} --decay {decay:g}")
    return "\n".join([
        f"`{command}` on {first['machine']}: the `jaxlr` arm's FCN-10, N = {depth}, decay "
        f"{decay:g}, {epochs} epochs on seed {seed}, each variant in a new process (in "
        "brackets: the change from the first row):",
        "",
        markdown_table(table, [Column("variant"), Column("weights", "weights digest"),
                               *(Column(key) for key in ENDPOINT_KEYS)]),
    ])


def run(epochs: int = 100, seed: int = 1, depth: int = 3, decay: float = 1e-3,
        isa: str = "AVX2", cores: int = 1) -> str:
    """Runs the four variants (this machine twice, XLA for ``isa``, ``cores`` cores); returns
    :func:`block`'s table."""
    common = (epochs, seed, depth, decay)
    rows = [{"variant": "this machine", **run_variant(*common)},
            {"variant": "this machine, again", **run_variant(*common)},
            {"variant": f"XLA for {isa}", **run_variant(*common, isa=isa)},
            {"variant": f"{cores} core{'s' if cores > 1 else ''}",
             **run_variant(*common, cores=cores)}]
    return block(rows, *common)


def main(argv: Sequence[str] | None = None) -> str:
    """``python -m experiments.reproducibility [options]``; prints and returns the block."""
    parser = argparse.ArgumentParser(prog="python -m experiments.reproducibility",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--depth", type=int, default=3, help="LoRITa's N")
    parser.add_argument("--decay", type=float, default=1e-3)
    parser.add_argument("--isa", default="AVX2", help="the capped variant's instruction set")
    parser.add_argument("--cores", type=int, default=1, help="the pinned variant's core count")
    args = parser.parse_args(argv)
    text = run(args.epochs, args.seed, args.depth, args.decay, args.isa, args.cores)
    print(text)
    return text


if __name__ == "__main__":
    main()
