"""What training checkpoints cost a `default` HyLoRADA cell (lmlab issue 19): wall time with checkpointing off,
with the defaults (`train.checkpoint_every=200`, `train.checkpoint_minutes=10`: a 50-step default cell writes its
final checkpoint only), and checkpointing every 10 steps; and the size of one checkpoint.

    .venv/bin/python benchmarks/checkpoint_cost.py [--rounds 3] [--config rslora+bias+landmarks] [--out DIR]

Each variant is `lmlab run hylorada --preset default --seeds 1 only=[CONFIG]` (CONFIG and its reference, `lora`)
in a fresh process with one torch thread, in interleaved rounds (order reversed every other round). The time of a
variant is the sum of its cells' `time_s` (training and evaluation of each cell, from results.jsonl: the cached base
and the shared data are not part of a cell); a ratio is the median over rounds of the round's ratio to `off`.
The checkpoint's size is measured on a separate run stopped with SIGTERM once the candidate cell has written one.
Writes `<date>-checkpoint_cost.json` and `.md` into the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from lmlab.benchsuite import write_results

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "off": ["train.checkpoint_every=null", "train.checkpoint_minutes=null"],
    "default": [],
    "every10": ["train.checkpoint_every=10"],
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "LMLAB_SHARE_CPU": "0"}


def command(out: Path, config: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "lmlab.cli", "run", "hylorada", "--preset", "default", "--seeds", "1", "--quiet",
            "--out", str(out), f"only=[{config}]", *extra]


def cell_seconds(config: str, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        done = subprocess.run(command(out, config, extra), capture_output=True, text=True, env=ENV, check=False)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        return sum(r["time_s"] for r in rows)


def checkpoint_size(config: str) -> dict:
    """Bytes of the first checkpoint the candidate cell writes (checkpoint_every=10), and what it holds."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        process = subprocess.Popen(command(out, config, ["train.checkpoint_every=10"]), env=ENV,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        state = out / "cells" / config / "seed-42" / "train_state"
        found = None
        while process.poll() is None and found is None:
            found = next(iter(sorted(state.glob("step-*"))), None) if state.exists() else None
            time.sleep(0.05)
        if found is None:
            raise RuntimeError("the run ended before the candidate cell wrote a checkpoint")
        time.sleep(0.5)  # the directory is complete once renamed; let the listing settle
        files = {p.name: p.stat().st_size for p in found.iterdir()}
        from safetensors import safe_open

        with safe_open(str(found / "tensors.safetensors"), "pt") as f:
            keys = list(f.keys())
            model_values = sum(_numel(f.get_slice(k).get_shape()) for k in keys if k.startswith("model."))
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=600)
        return {"files": files, "bytes": sum(files.values()), "tensors": len(keys),
                "model_tensors": sum(k.startswith("model.") for k in keys), "model_values": model_values}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--config", default="rslora+bias+landmarks")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    started = datetime.now()
    size = checkpoint_size(args.config)
    print(f"checkpoint: {size['bytes']} bytes, {size['model_tensors']} model tensors", file=sys.stderr)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    names = list(VARIANTS)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(cell_seconds(args.config, VARIANTS[name]))
            print(f"round {r + 1} {name}: {times[name][-1]:.1f} s of cells", file=sys.stderr)
    ratios = {name: statistics.median(a / b for a, b in zip(times[name], times["off"], strict=True))
              for name in names}
    result = {"started": started.isoformat(timespec="seconds"), "config": args.config, "rounds": args.rounds,
              "cell_seconds": times, "ratio_to_off": ratios, "checkpoint": size, "cores": os.cpu_count()}
    lines = [f"Checkpoint cost of a `default` HyLoRADA run, `only=[{args.config}]` (2 cells, seed 42), "
             f"{args.rounds} interleaved rounds, 1 torch thread, {result['started']}. Time: sum of the cells' time_s.",
             "",
             "| variant | cells (s, median) | ratio to off (median over rounds) |", "|---|---:|---:|"]
    lines += [f"| {n} | {statistics.median(times[n]):.1f} | {ratios[n]:.3f} |" for n in names]
    lines += ["", f"One checkpoint of the `{args.config}` cell: {size['bytes'] / 1024:.0f} KiB "
              f"({', '.join(f'{k} {v / 1024:.0f} KiB' for k, v in size['files'].items())}); "
              f"{size['model_tensors']} model tensors, {size['model_values']:,} trained values (the adapter only)."]
    write_results(Path(args.out), started, "-checkpoint_cost", result, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
