"""How far a study's metrics move with the CPU thread count alone: the numerical resolution behind
`lmlab.studies.attribution.RESOLUTION_PCT` (docs/protocol.md section 5).

    .venv/bin/python benchmarks/thread_rounding.py [--threads 1 2] [--configs lora,rslora,...] [--out DIR]

Runs `lmlab run hylorada --preset default --seeds 1 only=[CONFIGS]` once per thread count (`--threads T`, in a fresh
process; the built-in base is the same for every thread count, lmlab.studies.pretrain), then compares each cell's
metrics between thread counts: a float sum rounded in another order is the only difference. Prints and writes
`<date>-thread_rounding.json` and `.md` with the largest relative difference per metric.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from lmlab.benchsuite import write_results

REPO = Path(__file__).resolve().parents[1]
CONFIGS = "lora,rslora,rslora+landmarks,rslora-matched"
METRICS = ("val_ppl", "lim_ppl", "val_bpb")


def cells(threads: int, configs: str) -> dict[str, dict]:
    env = {**os.environ, "LMLAB_SHARE_CPU": "0"}
    env.pop("OMP_NUM_THREADS", None)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        done = subprocess.run([sys.executable, "-m", "lmlab.cli", "run", "hylorada", "--preset", "default",
                               "--seeds", "1", "--quiet", "--threads", str(threads), "--out", str(out),
                               f"only=[{configs}]"], capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return {r["config"]: r["metrics"] for r in rows if r["status"] == "ok"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs=2, default=[1, 2])
    parser.add_argument("--configs", default=CONFIGS)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    started = datetime.now()
    a, b = (cells(t, args.configs) for t in args.threads)
    diffs = {m: {c: abs(a[c][m] - b[c][m]) / abs(b[c][m]) for c in a if c in b and b[c].get(m)} for m in METRICS}
    result = {"started": started.isoformat(timespec="seconds"), "threads": args.threads, "configs": sorted(a),
              "relative_difference": diffs, "largest": {m: max(d.values()) for m, d in diffs.items() if d}}
    lines = [f"`default` HyLoRADA cells (seed 42) computed on {args.threads[0]} and on {args.threads[1]} torch "
             f"threads, {result['started']}: |difference| / value per metric.", "",
             "| configuration | " + " | ".join(METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    lines += [f"| {c} | " + " | ".join(f"{diffs[m].get(c, float('nan')):.1e}" for m in METRICS) + " |"
              for c in sorted(a)]
    lines += ["", "Largest: " + ", ".join(f"{m} {v:.1e}" for m, v in result["largest"].items()) + "."]
    write_results(Path(args.out), started, "-thread_rounding", result, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
