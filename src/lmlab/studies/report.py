"""Reports generated from data: summary.json, report.md, report.tex, results.csv and plots.

Everything here is a function of `study.yaml`, `results.jsonl` and the cells' `metrics.jsonl`, so
`lmlab report DIR` reproduces a finished run's summary exactly.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path

from lmlab.studies import stats
from lmlab.studies.rundir import RunDir, atomic_write_text, json_safe

LOWER_IS_BETTER_HINTS = ("ppl", "bpb", "loss", "time", "mem", "latency", "invalid", "kv_bytes", "prompt_tokens")


def lower_is_better(metric: str) -> bool:
    leaf = metric.rsplit("/", 1)[-1]
    if leaf.endswith("_saved") or leaf.startswith("acc") or "per_s" in leaf or "compression" in leaf:
        return False
    return any(h in leaf for h in LOWER_IS_BETTER_HINTS)


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value != 0 and (abs(value) >= 1e7 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        if abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


# ---------------------------------------------------------------------------------------------------
# summary.json


def _scalar_metrics(rows: list[dict]) -> list[str]:
    names: list[str] = []
    for r in rows:
        for k, v in r.get("metrics", {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in names:
                names.append(k)
    return names


def build_summary(record: dict, rows: list[dict]) -> dict:
    configs = record["configurations"]
    reference = record["reference"]
    candidate = record["candidate"]
    primary = record["primary_metric"]
    primary_lower = record.get("lower_is_better", True)
    by_config: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_config[r["config"]].append(r)
    metric_names = _scalar_metrics(rows)
    ref_values = {m: {r["seed"]: r["metrics"].get(m) for r in by_config.get(reference, []) if r["status"] == "ok"}
                  for m in metric_names}
    summary_configs = {}
    for name in configs:
        cell_rows = sorted(by_config.get(name, []), key=lambda r: record["seeds"].index(r["seed"])
                           if r["seed"] in record["seeds"] else r["seed"])
        ok = [r for r in cell_rows if r["status"] == "ok"]
        entry = {
            "trainable_params": _first(ok, "params", "trainable_params"),
            "component_params": _first(ok, "params", "component_params"),
            "n_ok": len(ok),
            "n_failed": sum(r["status"] != "ok" for r in cell_rows),
            "metrics": {},
            "vs_reference": {},
        }
        for m in metric_names:
            values = [r["metrics"].get(m) for r in ok if m in r["metrics"]]
            if values:
                entry["metrics"][m] = stats.describe(values)
            if name != reference and values:
                change = stats.paired_relative_change({r["seed"]: r["metrics"].get(m) for r in ok}, ref_values[m])
                if change is not None:
                    entry["vs_reference"][m] = change
        decision = _decision(entry, primary, primary_lower)
        if decision is not None:
            entry["decision"] = decision
            comp = entry["component_params"]
            if decision["scenario"] != "not-significant" and decision["improvement_pct"] > 0 and comp:
                entry["efficiency_params_per_pct"] = comp / decision["improvement_pct"]
        summary_configs[name] = entry
    failed = [{"config": r["config"], "seed": r["seed"], "error": r.get("error")}
              for r in rows if r["status"] != "ok"]
    cand = summary_configs.get(candidate, {}).get("decision")
    return json_safe({
        "study": record["study"],
        "preset": record["preset"],
        "reference": reference,
        "candidate": candidate,
        "primary_metric": primary,
        "seeds": record["seeds"],
        "configs": summary_configs,
        "decision": _decision_record(cand, candidate, reference, primary),
        "failed_cells": failed,
    })


def _first(rows: list[dict], key: str, sub: str):
    for r in rows:
        value = r.get(key, {}).get(sub)
        if value is not None:
            return value
    return None


def _decision(entry: dict, metric: str, lower: bool) -> dict | None:
    change = entry["vs_reference"].get(metric)
    if change is None:
        return None
    sign = -1.0 if lower else 1.0
    improvement = sign * change["delta_pct"]
    ci = change["ci95"]
    interval = sorted([sign * ci[0], sign * ci[1]]) if ci else None
    return {
        "scenario": stats.scenario(improvement, interval),
        "improvement_pct": improvement,
        "ci95": interval,
        "p_value": change["p_value"],
        "n": change["n"],
    }


def _decision_record(decision: dict | None, candidate: str, reference: str, metric: str) -> dict:
    if decision is None:
        return {"scenario": "not-significant", "text": f"No decision: '{candidate}' and '{reference}' have no "
                f"paired '{metric}' values (missing or failed cells).", "candidate": candidate,
                "reference": reference, "metric": metric}
    return {**decision, "text": decision_text(decision, candidate, reference, metric), "candidate": candidate,
            "reference": reference, "metric": metric}


def decision_text(d: dict, candidate: str, reference: str, metric: str) -> str:
    imp = d["improvement_pct"]
    ci = d["ci95"]
    ci_text = f"95% CI [{ci[0]:+.2f}%, {ci[1]:+.2f}%]" if ci else "no interval (one seed)"
    p_text = f"p = {d['p_value']:.3g}" if d.get("p_value") is not None else "no p-value"
    direction = "better" if imp > 0 else "worse"
    head = (f"'{candidate}' is {abs(imp):.2f}% {direction} than '{reference}' on {metric} "
            f"({ci_text}, {p_text}, {d['n']} paired seeds)")
    meaning = {
        "A": "scenario A: a strong improvement (>= 2%)",
        "B": "scenario B: a moderate improvement (1-2%)",
        "C": "scenario C: a minimal improvement (0.5-1%)",
        "D": "scenario D: no meaningful improvement (< 0.5%)",
        "not-significant": "not significant: the interval contains 0, so the data cannot tell the two apart",
    }[d["scenario"]]
    if d["scenario"] in "ABCD" and imp < 0:
        meaning = f"scenario D: the candidate is significantly worse ({imp:+.2f}%)"
    return f"{head}: {meaning}."


# ---------------------------------------------------------------------------------------------------
# report.md / report.tex / results.csv


def _mean_std(desc: dict | None) -> str:
    if not desc or desc.get("mean") is None:
        return "-"
    if desc.get("std") is None:
        return fmt(desc["mean"])
    return f"{fmt(desc['mean'])} ± {fmt(desc['std'], 2)}"


def _change(change: dict | None) -> str:
    if not change:
        return "-"
    ci = change.get("ci95")
    ci_text = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
    p = change.get("p_value")
    return f"{change['delta_pct']:+.2f}%{ci_text}" + (f" (p={p:.2g})" if p is not None else "")


def main_table(summary: dict, metrics: list[str]) -> list[str]:
    header = ["configuration", *metrics, "trainable params", "component params", "ok/failed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in summary["configs"].items():
        cells = [f"**{name}**" if name == summary["reference"] else name]
        cells += [_mean_std(entry["metrics"].get(m)) for m in metrics]
        cells += [fmt(entry["trainable_params"]), fmt(entry["component_params"]),
                  f"{entry['n_ok']}/{entry['n_failed']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def change_table(summary: dict, metrics: list[str]) -> list[str]:
    ref = summary["reference"]
    header = ["configuration", *[f"{m} change vs {ref} [95% CI] (p)" for m in metrics], "decision",
              "params per 1%"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in summary["configs"].items():
        if name == ref:
            continue
        cells = [name] + [_change(entry["vs_reference"].get(m)) for m in metrics]
        cells.append(entry.get("decision", {}).get("scenario", "-"))
        cells.append(fmt(entry.get("efficiency_params_per_pct")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_csv(run: RunDir, rows: list[dict]) -> None:
    metric_names = _scalar_metrics(rows)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["config", "seed", "status", *metric_names, "trainable_params", "time_s", "error"])
    for r in rows:
        writer.writerow([r["config"], r["seed"], r["status"], *[r["metrics"].get(m, "") for m in metric_names],
                         r.get("params", {}).get("trainable_params", ""), r.get("time_s", ""), r.get("error") or ""])
    atomic_write_text(run.root / "results.csv", buf.getvalue())


def _tex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("Δ", r"$\Delta$"), ("±", r"$\pm$")):
        text = text.replace(a, b)
    return text


def write_tex(run: RunDir, summary: dict, metrics: list[str]) -> None:
    ref = summary["reference"]
    primary = summary["primary_metric"]
    cols = "l" + "r" * (len(metrics) + 2)
    lines = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
             " & ".join(["Configuration", *[_tex_escape(m) for m in metrics],
                         _tex_escape(f"Δ{primary} vs {ref}"), "Params"]) + r" \\", r"\midrule"]
    for name, entry in summary["configs"].items():
        vals = []
        for m in metrics:
            d = entry["metrics"].get(m)
            if not d or d.get("mean") is None:
                vals.append("--")
            elif d.get("std") is None:
                vals.append(f"{fmt(d['mean'])}")
            else:
                vals.append(rf"{fmt(d['mean'])} $\pm$ {fmt(d['std'], 2)}")
        ch = entry["vs_reference"].get(primary)
        delta = "--" if not ch else (rf"{ch['delta_pct']:+.2f}\%" +
                                     (rf" [{ch['ci95'][0]:+.2f}, {ch['ci95'][1]:+.2f}]" if ch.get("ci95") else ""))
        lines.append(" & ".join([_tex_escape(name), *vals, delta, fmt(entry["trainable_params"])]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}",
              rf"\caption{{{_tex_escape(summary['study'])} ({_tex_escape(summary['preset'])} preset), mean $\pm$ std "
              rf"over seeds {', '.join(str(s) for s in summary['seeds'])}; change vs {_tex_escape(ref)} with 95\% "
              rf"t-interval. {_tex_escape(summary['decision']['text'])}}}",
              r"\end{table}", ""]
    atomic_write_text(run.root / "report.tex", "\n".join(lines))


def cell_curves(run: RunDir, configs: list[str], kind: str, key: str) -> dict[str, dict[int, list[float]]]:
    """{config: {step: [value per seed]}} of `key` in the cells' metrics.jsonl records of `kind`."""
    curves: dict[str, dict[int, list[float]]] = {}
    for config in configs:
        for metrics_file in sorted((run.root / "cells" / config).glob("seed-*/metrics.jsonl")):
            for line in metrics_file.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line) if line.strip() else {}
                if rec.get("kind") == kind and rec.get(key) is not None:
                    curves.setdefault(config, {}).setdefault(rec["step"], []).append(rec[key])
    return curves


def mean_over_seeds(curves: dict[str, dict[int, list[float]]]) -> dict[str, tuple[list, list]]:
    """{config: (steps, mean value per step)} from `cell_curves`."""
    out = {}
    for config, points in curves.items():
        steps = sorted(points)
        out[config] = (steps, [sum(points[s]) / len(points[s]) for s in steps])
    return out


def line_plot(run: RunDir, name: str, series: dict[str, tuple[list, list]], *, xlabel: str, ylabel: str,
              title: str, marker: str | None = None, logy: bool = False, ylim: tuple | None = None,
              shade: tuple[float, float, str] | None = None) -> str:
    """One line per series (None values become gaps), saved as plots/<name>; returns its relative path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (x, y) in series.items():
        ax.plot(x, [float("nan") if v is None else v for v in y], marker=marker, label=label)
    if shade is not None:
        ax.axvspan(shade[0], shade[1], color="grey", alpha=0.1, label=shade[2])
    if logy:
        ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    label_axes(ax, xlabel=xlabel, ylabel=ylabel, title=title)
    return save_figure(fig, run, name)


def label_axes(ax, *, xlabel: str, ylabel: str, title: str) -> None:
    """The labels, title, legend and grid every report plot has."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def training_curves_plot(run: RunDir, configs: list[str]) -> str | None:
    """Training loss against optimizer step, one line per configuration (mean over seeds)."""
    curves = cell_curves(run, configs, "train", "loss")
    if not curves:
        return None
    return line_plot(run, "training_curves.png", mean_over_seeds(curves), xlabel="optimizer step",
                     ylabel="training loss (mean over seeds)", title="Training curves")


def save_figure(fig, run: RunDir, name: str) -> str:
    import matplotlib.pyplot as plt

    run.plots.mkdir(parents=True, exist_ok=True)
    path = run.plots / name
    tmp = run.plots / f".{name}.tmp.png"
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return f"plots/{name}"


def write_reports(run: RunDir) -> dict:
    from lmlab.studies.runner import get_study

    record = run.read_study()
    rows = run.read_results()
    summary = build_summary(record, rows)
    run.write_json("summary.json", summary)
    write_csv(run, rows)
    metrics = [m for m in record.get("table_metrics", [record["primary_metric"]])
               if any(m in e["metrics"] for e in summary["configs"].values())]
    write_tex(run, summary, metrics)
    study = get_study(record["study"])
    lines = [
        f"# {record['study']} study ({record['preset']} preset)",
        "",
        f"Seeds: {', '.join(str(s) for s in record['seeds'])}. Reference: `{summary['reference']}`. "
        f"Candidate: `{summary['candidate']}`. Cells finished: {len(rows)} of "
        f"{len(record['configurations']) * len(record['seeds'])}. Generated from `results.jsonl` "
        f"(regenerate with `lmlab report {run.root}`).",
        "",
        "## Decision",
        "",
        summary["decision"]["text"],
        "",
        "## Results (mean ± std over seeds)",
        "",
        *main_table(summary, metrics),
        "",
        f"## Change vs `{summary['reference']}` (per-seed relative change, mean [95% t-interval], paired t-test)",
        "",
        *change_table(summary, [m for m in record.get("change_metrics", [record["primary_metric"]])
                                if any(m in e["metrics"] for e in summary["configs"].values())]),
        "",
    ]
    curve = training_curves_plot(run, record["configurations"])
    lines += study.report_sections(summary, rows, run, record)
    if summary["failed_cells"]:
        lines += ["## Failed cells", "", "| configuration | seed | error |", "|---|---|---|"]
        lines += [f"| {f['config']} | {f['seed']} | {(f['error'] or '').replace('|', '/')} |"
                  for f in summary["failed_cells"]]
        lines.append("")
    plots = sorted(p.name for p in run.plots.glob("*.png")) if run.plots.exists() else []
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p}](plots/{p})" for p in plots]
        lines.append("")
    if curve is None:
        lines += ["(No training curves: no cell has recorded training steps yet.)", ""]
    lines += ["## Files", "", "`summary.json` (machine-readable summary), `results.jsonl` (one line per cell), "
              "`results.csv`, `report.tex` (LaTeX table), `study.yaml` (resolved configuration and library versions), "
              "`cells/<config>/seed-<s>/` (per-cell training curves, samples and artifacts).", ""]
    atomic_write_text(run.root / "report.md", "\n".join(lines))
    return summary


def regenerate(directory: Path) -> Path:
    run = RunDir(directory)
    write_reports(run)
    return run.root
