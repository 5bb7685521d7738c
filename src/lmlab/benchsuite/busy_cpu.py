"""Smoke studies on a busy CPU (lmlab issue 18, point 1): the default run against `--threads 1` while another
process keeps the cores busy with torch matmuls on its default threads.

    .venv/bin/python benchmarks/busy_cpu.py [--studies hylorada mu] [--rounds 3] [--load busy idle]
                                            [--baseline-src DIR] [--variants NAME ...] [--out benchmarks/results]
    .venv/bin/python benchmarks/busy_cpu.py --pool RESULT.json ...   (idle default / before-default, pooled)
    lmlab bench --only busy_cpu            (the same, 3 rounds; 1 with --quick)

Each variant is `lmlab run STUDY --preset smoke` in a fresh process, timed by wall clock:

- `default`: as a user runs it (torch's default threads, lmlab's CPU kernels on);
- `threads1`: with `--threads 1`;
- `no-kernels`: default threads with `LMLAB_CPU_KERNELS=0` (torch's own ops only);
- with `--baseline-src DIR` (the `src` folder of another lmlab checkout, e.g. `git archive HEAD src | tar -x -C
  /tmp/before`), `before-default` and `before-threads1`: that code, run the same way (PYTHONPATH=DIR).

Under each load (`busy`: a background process runs 512 x 512 float32 matmuls in a loop on torch's default threads,
started before and stopped after that load's rounds; `idle`: nothing in the background) the variants run in
interleaved rounds, their order reversed every other round, so drifts in the machine's load fall on every variant
alike. A ratio is the median over rounds of that round's ratio (e.g. default / threads1 of the same round).
Children get an environment without OMP_*, GOMP_*, MKL_NUM_THREADS and LMLAB_CPU_KERNELS (what `lmlab bench`
sets for its own measurements), so they see what a user's shell would give them.

The primary metric's values of every cell are kept per run, so the table also says whether the variants computed
the same results (largest relative difference to the `threads1` run of the same round).
Writes `<date>-busy_cpu.json` and `.md` into the output folder (`<date>T<time>-busy_cpu.*` when that exists).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from lmlab.benchsuite import results_dir, write_results
from lmlab.stats import median_interval, paired_ratio, round_ratios

STUDIES = ("hylorada", "mu")
TARGET = 1.3  # the issue's: busy default / busy threads1
BUSY_SIZE = 512
BUSY = f"""
import torch
a, b = torch.randn({BUSY_SIZE}, {BUSY_SIZE}), torch.randn({BUSY_SIZE}, {BUSY_SIZE})
print("ready", flush=True)
while True:
    torch.mm(a, b)
"""
# what the children must not inherit: lmlab bench's own thread settings, a user's kernel switch
CLEARED = ("OMP_", "GOMP_", "KMP_", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "LMLAB_CPU_KERNELS")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEARED)}
    return {**env, **extra}


def variants(baseline_src: str | None) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (extra command-line arguments, extra environment)."""
    out = {"default": ([], {}), "threads1": (["--threads", "1"], {}), "no-kernels": ([], {"LMLAB_CPU_KERNELS": "0"})}
    if baseline_src:
        src = str(Path(baseline_src).resolve())
        out["before-default"] = ([], {"PYTHONPATH": src})
        out["before-threads1"] = (["--threads", "1"], {"PYTHONPATH": src})
    return out


def primary_values(run_dir: Path) -> dict[str, list[float]]:
    """The primary metric's values of every config of a finished run (summary.json), {} if there is none."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    metric = summary.get("primary_metric")
    values = {}
    for name, config in (summary.get("configs") or {}).items():
        entry = (config.get("metrics") or {}).get(metric) if isinstance(config, dict) else None
        if isinstance(entry, dict) and entry.get("values"):
            values[name] = [float(v) for v in entry["values"]]
    return values


def run_once(study: str, args: list[str], env: dict[str, str], timeout: float) -> dict:
    """One `lmlab run STUDY --preset smoke` in a fresh process: wall seconds and the primary metric's values."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "lmlab.cli", "run", study, "--preset", "smoke", "--out", str(out), "--quiet",
                   *args]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=tmp, env=env,
                              timeout=timeout)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"`lmlab {' '.join(command[3:])}` failed ({done.returncode}):\n{done.stderr[-2000:]}")
        return {"wall_s": wall, "values": primary_values(out)}


class Background:
    """The busy process: torch matmuls in a loop on torch's default threads, until stopped."""

    def __enter__(self) -> Background:
        self.process = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, env=clean_env(),
                                        text=True)
        self.process.stdout.readline()  # "ready": torch is loaded and the loop starts
        time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def max_rel_diff(a: dict[str, list[float]], b: dict[str, list[float]]) -> float | None:
    if not a or not b or set(a) != set(b):
        return None
    diffs = [abs(x - y) / max(abs(y), 1e-12) for name in a for x, y in zip(a[name], b[name], strict=False)]
    return max(diffs, default=0.0)


def measure(studies: list[str], rounds: int, loads: list[str], baseline_src: str | None = None,
            log=print, timeout: float = 1800.0, runner=run_once, background=Background,
            only: list[str] | None = None) -> dict:
    """Every variant (or those named in `only`, always with threads1, the reference of the metric check) of every
    study under every load, `rounds` interleaved rounds; results with ratios.
    (`runner(study, args, env, timeout)` and `background()` are the real ones unless a test gives its own.)"""
    cases = variants(baseline_src)
    if only:
        unknown = sorted(set(only) - set(cases))
        if unknown:
            raise SystemExit(f"busy_cpu: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(cases)} "
                             "(before-* need --baseline-src)")
        cases = {name: v for name, v in cases.items() if name in {*only, "threads1"}}
    results: dict = {"loads": {}}
    for load in loads:
        results["loads"][load] = {}
        for study in studies:
            log(f"busy_cpu: {study} smoke, {load}: {rounds} round(s) of {', '.join(cases)}")
            runs: dict[str, list[dict]] = {name: [] for name in cases}
            names = list(cases)
            with background() if load == "busy" else contextlib.nullcontext():
                for r in range(rounds):
                    for name in names if r % 2 == 0 else names[::-1]:
                        extra_args, extra_env = cases[name]
                        runs[name].append(runner(study, extra_args, clean_env(**extra_env), timeout))
                        log(f"  round {r + 1} {name}: {runs[name][-1]['wall_s']:.1f} s")
            results["loads"][load][study] = summarize(runs)
    results["ratios"] = ratio_table(results["loads"])
    return results


def summarize(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for name, items in runs.items():
        walls = [i["wall_s"] for i in items]
        diffs = [max_rel_diff(i["values"], ref["values"]) for i, ref in zip(items, runs["threads1"], strict=True)]
        out[name] = {"wall_s": walls, "median_s": statistics.median(walls), "min_s": min(walls),
                     "max_rel_diff_vs_threads1": max((d for d in diffs if d is not None), default=None),
                     "values": items[-1]["values"]}
    return out


def ratio_table(loads: dict) -> list[dict]:
    """The ratios of interest, each the median over rounds of the per-round ratio."""
    rows = []
    for load, studies in loads.items():
        for study, v in studies.items():
            pairs = [("default", "threads1"), ("no-kernels", "threads1"), ("before-default", "before-threads1"),
                     ("default", "before-default")]
            for ours, ref in [(a, b) for a, b in pairs if a in v and b in v]:
                ratio = paired_ratio(v[ours]["wall_s"], v[ref]["wall_s"])
                target = TARGET if (load, ours, ref) == ("busy", "default", "threads1") else None
                if (ours, ref) == ("default", "before-default") and load == "idle":
                    target = 1.0  # no slower than before on an idle machine
                rows.append({"load": load, "study": study, "ours": ours, "reference": ref, "ratio": ratio,
                             "ratio_of_fastest": v[ours]["min_s"] / v[ref]["min_s"],
                             "ours_s": v[ours]["median_s"], "reference_s": v[ref]["median_s"],
                             "target": None if target is None else f"<= {target:g}",
                             "met": None if target is None else ratio <= target})
    return rows


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Busy-CPU benchmark of {results['started']} ({m['cores']} cores, load average "
             f"{m['load_average_start'][0]:.1f} at start, {m['load_average_end'][0]:.1f} at end; torch {m['torch']}): "
             "`lmlab run STUDY --preset "
             f"smoke` wall time, {results['rounds']} interleaved round(s) per load. Ratio: median over rounds of "
             "ours / reference (times: medians); fastest: the ratio of each side's fastest round, the best estimate "
             "of an undisturbed machine when other jobs share it. busy: another process runs "
             f"{BUSY_SIZE} x {BUSY_SIZE} torch matmuls on its default threads.", "",
             "| load | study | ours | reference | ours (s) | reference (s) | ratio | fastest | target | met |",
             "|---|---|---|---|---:|---:|---:|---:|---:|:-:|"]
    for r in results["ratios"]:
        met = "" if r["met"] is None else "yes" if r["met"] else "**no**"
        lines.append(f"| {r['load']} | {r['study']} | {r['ours']} | {r['reference']} | {r['ours_s']:.1f} "
                     f"| {r['reference_s']:.1f} | {r['ratio']:.2f} | {r['ratio_of_fastest']:.2f} "
                     f"| {r['target'] or ''} | {met} |")
    lines += ["", "| load | study | variant | wall times (s) | max relative difference of the primary metric vs "
                  "threads1 |", "|---|---|---|---|---:|"]
    for load, studies in results["loads"].items():
        for study, v in studies.items():
            for name, item in v.items():
                diff = item["max_rel_diff_vs_threads1"]
                lines.append(f"| {load} | {study} | {name} | {', '.join(f'{w:.1f}' for w in item['wall_s'])} "
                             f"| {'' if diff is None else f'{diff:.1e}'} |")
    return "\n".join(lines) + "\n"


def run(studies: list[str], rounds: int, loads: list[str], out: Path, baseline_src: str | None = None,
        log=print, only: list[str] | None = None) -> Path:
    """Measure, then write `<date>-busy_cpu.json` and `.md` into `out`; returns the JSON path."""
    import torch

    started = datetime.now()
    results = {"started": started.isoformat(timespec="seconds"), "rounds": rounds, "studies": studies,
               "baseline_src": baseline_src,
               "machine": {"cores": os.cpu_count(), "load_average_start": os.getloadavg(), "torch": torch.__version__}}
    results.update(measure(studies, rounds, loads, baseline_src, log=log, only=only))
    results["machine"]["load_average_end"] = os.getloadavg()
    return write_results(out, started, "-busy_cpu", results, markdown(results))


def pooled(paths: list[Path], ours: str = "default", reference: str = "before-default", load: str = "idle"
           ) -> list[dict]:
    """Per study, every paired round of `ours` / `reference` under `load` in the result files `paths`, pooled: the
    median of the per-round ratios with its distribution-free 95% interval (rounds pair within a run only)."""
    ratios: dict[str, list[float]] = {}
    for path in paths:
        for study, v in json.loads(Path(path).read_text())["loads"].get(load, {}).items():
            if ours in v and reference in v:
                ratios.setdefault(study, []).extend(round_ratios(v[ours]["wall_s"], v[reference]["wall_s"]))
    return [{"study": study, "rounds": len(r), "ratio": statistics.median(r), "interval": median_interval(r)}
            for study, r in ratios.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", nargs="+", default=list(STUDIES), choices=STUDIES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load", nargs="+", default=["busy", "idle"], choices=["busy", "idle"])
    parser.add_argument("--baseline-src", help="the src folder of another lmlab version to run as before-*")
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="run only these variants (threads1 always runs: the metric check's reference), e.g. "
                             "`--variants default before-default` for the idle before/after comparison alone")
    parser.add_argument("--out", default=str(results_dir()), help="folder of the results (default: %(default)s)")
    parser.add_argument("--pool", nargs="+", metavar="RESULT.json",
                        help="measure nothing: pool the idle default / before-default rounds of these result files")
    args = parser.parse_args(argv)
    if args.pool:
        for row in pooled([Path(p) for p in args.pool]):
            low, high = row["interval"] or (float("nan"), float("nan"))
            print(f"{row['study']}: default / before-default {row['ratio']:.3f}, 95% interval of the median "
                  f"[{low:.3f}, {high:.3f}], {row['rounds']} paired rounds from {len(args.pool)} file(s)")
        return
    path = run(args.studies, args.rounds, args.load, Path(args.out), args.baseline_src, only=args.variants)
    print(path.with_suffix(".md").read_text())
    print(f"results: {path}")


if __name__ == "__main__":
    main()
