#!/usr/bin/env python3
"""Stop `lmlab run hylorada --preset smoke` with SIGTERM at random moments and check what the user sees.

    .venv/bin/python scripts/sigterm_stress.py [--trials 12] [--parallel 2] [--out /tmp/sigterm-stress]

Each trial starts the smoke study, waits until a random number of cells is recorded (plus a random fraction of a
second), sends SIGTERM, and checks that the run exits with 128 + SIGTERM, names `--resume`, and prints no Python
traceback. A loaded machine makes the signal land in more places: run it beside a busy loop (e.g. `yes > /dev/null
&`). Exit code 1 at the first bad trial, after printing its stderr.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def trial(out: Path, parallel: int, rows: int, delay_s: float) -> tuple[int, str]:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "lmlab.cli", "run", "hylorada", "--preset", "smoke", "--out", str(out), "--quiet"]
    if parallel > 1:
        command += ["--parallel", str(parallel)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = out / "results.jsonl"
    while proc.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= rows:
            break
        time.sleep(0.05)
    time.sleep(delay_s)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--parallel", type=int, default=2, help="worker processes (1: cells one after another)")
    parser.add_argument("--out", default="/tmp/sigterm-stress")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    clean = 0
    for i in range(args.trials):
        rows, delay = rng.choice([1, 3, 5, 8]), rng.random() * 0.5
        code, stderr = trial(Path(args.out), args.parallel, rows, delay)
        finished = code == 0  # the run ended before the signal: nothing to check
        ok = finished or (code == 128 + signal.SIGTERM and "--resume" in stderr and "Traceback" not in stderr)
        print(f"trial {i + 1}: SIGTERM after {rows} cell(s) + {delay:.2f} s: exit {code}, "
              f"{'finished first' if finished else 'ok' if ok else 'BAD'}", flush=True)
        if not ok:
            print(stderr, file=sys.stderr)
            return 1
        clean += 1
    print(f"{clean} of {args.trials} trials clean")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
