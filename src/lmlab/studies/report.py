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

from lmlab.studies import attribution, stats
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


def comparison_specs(record: dict) -> list[dict]:
    """The study's declared comparisons among the configurations that ran; a record without them (older runs,
    studies that declare none) compares every configuration with the reference, the candidate as the headline."""
    configs = record["configurations"]
    declared = record.get("comparisons")
    if declared is None:
        declared = [{"component": name, "candidate": name, "parent": record["reference"],
                     "headline": name == record["candidate"]} for name in configs if name != record["reference"]]
    return [c for c in declared if c["candidate"] in configs and c["parent"] in configs]


def build_summary(record: dict, rows: list[dict]) -> dict:
    configs = record["configurations"]
    reference = record["reference"]
    candidate = record["candidate"]
    primary = record["primary_metric"]
    primary_lower = record.get("lower_is_better", True)
    roles = record.get("roles", {})
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
        role = roles.get(name, {})
        if role:
            entry.update(role=role.get("role"), invalid=bool(role.get("invalid")), note=role.get("note", ""))
        for m in metric_names:
            values = [r["metrics"].get(m) for r in ok if m in r["metrics"]]
            if values:
                entry["metrics"][m] = stats.describe(values)
            if name != reference and values:
                change = stats.paired_relative_change({r["seed"]: r["metrics"].get(m) for r in ok}, ref_values[m])
                if change is not None:
                    entry["vs_reference"][m] = change
        summary_configs[name] = entry
    ratio = record.get("param_match_ratio")
    if ratio is not None:
        ref_params = summary_configs.get(reference, {}).get("trainable_params")
        for name, entry in summary_configs.items():
            base_trained = _first([r for r in by_config.get(name, []) if r["status"] == "ok"], "params",
                                  "base_params_trained")
            entry["param_matched"], entry["param_note"] = attribution.parameter_match(
                entry["trainable_params"], base_trained, ref_params, ratio)
    values = attribution.per_seed_values(rows)
    params = {name: e["trainable_params"] for name, e in summary_configs.items()}
    comparisons = [attribution.judge_comparison(spec, values, params, roles, primary, primary_lower)
                   for spec in comparison_specs(record)]
    for comp in comparisons:  # a configuration's decision is that of the comparison it is the candidate of
        entry = summary_configs[comp["candidate"]]
        if "decision" not in entry:
            entry["decision"] = attribution.decision_record(comp, comp["candidate"], comp["parent"], primary)
            if comp["params_per_pct"] is not None:
                entry["efficiency_params_per_pct"] = comp["params_per_pct"]
    headline = next((c for c in comparisons if c["headline"]), None)
    declared = next((c for c in record.get("comparisons", []) if c.get("headline")), None)
    if headline is None and declared is not None:  # the headline's configurations were not all selected (only=)
        candidate, reference = declared["candidate"], declared["parent"]
    missing = [c for c in (candidate, reference) if c not in configs]
    claims = [attribution.judge_claim(spec, values, comparisons, primary_lower) for spec in record.get("claims", [])]
    failed = [{"config": r["config"], "seed": r["seed"], "error": r.get("error")}
              for r in rows if r["status"] != "ok"]
    summary = {
        "study": record["study"],
        "preset": record["preset"],
        "reference": reference,
        "candidate": headline["candidate"] if headline else candidate,
        "primary_metric": primary,
        "seeds": record["seeds"],
        "configs": summary_configs,
        "comparisons": comparisons,
        "decision": attribution.decision_record(headline if headline and headline["n"] else None,
                                                headline["candidate"] if headline else candidate,
                                                headline["parent"] if headline else reference, primary, missing),
        "failed_cells": failed,
    }
    if claims:
        summary["claims"] = claims
    return json_safe(summary)


def _first(rows: list[dict], key: str, sub: str):
    for r in rows:
        value = r.get(key, {}).get(sub)
        if value is not None:
            return value
    return None


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


def config_label(name: str, entry: dict, summary: dict) -> str:
    """A configuration's name as tables show it: the reference in bold, a diagnostic marked invalid."""
    if entry.get("invalid"):
        return f"{name} (INVALID: {entry.get('note') or 'diagnostic'})"
    return f"**{name}**" if name == summary["reference"] else name


def main_table(summary: dict, metrics: list[str]) -> list[str]:
    matched = any("param_matched" in e for e in summary["configs"].values())
    roles = any(e.get("role") for e in summary["configs"].values())
    header = ["configuration", *(["role"] if roles else []), *metrics, "trainable params", "component params",
              *(["parameter-matched"] if matched else []), "ok/failed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in summary["configs"].items():
        cells = [config_label(name, entry, summary)]
        if roles:
            cells.append(entry.get("role") or "-")
        cells += [_mean_std(entry["metrics"].get(m)) for m in metrics]
        cells += [fmt(entry["trainable_params"]), fmt(entry["component_params"])]
        if matched:
            flag = entry.get("param_matched")
            cells.append("-" if flag is None else "yes" if flag else f"no: {entry.get('param_note', '')}")
        cells.append(f"{entry['n_ok']}/{entry['n_failed']}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def change_table(summary: dict, metrics: list[str]) -> list[str]:
    ref = summary["reference"]
    header = ["configuration", *[f"{m} change vs {ref} [95% CI] (p)" for m in metrics]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in summary["configs"].items():
        if name == ref:
            continue
        cells = [config_label(name, entry, summary)] + [_change(entry["vs_reference"].get(m)) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def attribution_table(summary: dict) -> list[str]:
    """One row per comparison: the component's effect vs its parent and vs its controls, label, params per 1%."""
    header = ["component", "candidate", "added to", "params added", "improvement vs parent [95% CI] (p)",
              "improvement vs controls [95% CI]", "decision", "params per 1%"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in summary["comparisons"]:
        effect = c if c["n"] else None
        controls = "; ".join(f"{k['config']}: " + (attribution.effect_text(k) if k["improvement_pct"] is not None
                                                   else "not run") for k in c["controls"]) or "-"
        cells = [("**" + c["component"] + "**") if c["headline"] else c["component"], c["candidate"], c["parent"],
                 "-" if c["params_added"] is None else f"{c['params_added']:+,}", attribution.effect_text(effect),
                 controls, c["scenario"], fmt(c["params_per_pct"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def claims_table(summary: dict) -> list[str]:
    lines = ["| claim | setting in the notes | what this run measured (95% CI) | verdict |", "|---|---|---|---|"]
    for c in summary.get("claims", []):
        verdict = c["verdict"] + (f". Known explanation - {c['explanation']}" if c.get("explanation") else "")
        lines.append(f"| {c['id']}: {c['claim']} | {c['setting']} | {c['measured']} | {verdict} |".replace("\n", " "))
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
    colours = plt.get_cmap("tab10" if len(series) <= 10 else "tab20").colors  # a distinct colour per series
    for i, (label, (x, y)) in enumerate(series.items()):
        ax.plot(x, [float("nan") if v is None else v for v in y], marker=marker, label=label,
                color=colours[i % len(colours)])
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


def with_declarations(study, record: dict) -> dict:
    """A run's record with the study's comparisons, roles, claims and parameter matching where the record predates
    them, so `lmlab report` on an older run draws today's conclusions from its cells."""
    from lmlab.config import build
    from lmlab.studies.runner import declarations

    if "comparisons" in record or "roles" in record:
        return record
    cfg = build(study.config_cls, record["config"], where="study.yaml")
    return {**record, **declarations(study, cfg, record["configurations"])}


def write_reports(run: RunDir) -> dict:
    from lmlab.studies.runner import get_study

    record = run.read_study()
    study = get_study(record["study"])
    record = with_declarations(study, record)
    rows = run.read_results()
    summary = build_summary(record, rows)
    run.write_json("summary.json", summary)
    write_csv(run, rows)
    metrics = [m for m in record.get("table_metrics", [record["primary_metric"]])
               if any(m in e["metrics"] for e in summary["configs"].values())]
    write_tex(run, summary, metrics)
    lines = [f"# {record['study']} study ({record['preset']} preset)", ""]
    if record["preset"] == "smoke":
        lines += ["**This `smoke` run checks that the pipeline works end to end; its numbers are not evidence for or "
                  "against anything** (seconds of training on a very small model).", ""]
    lines += [
        f"Seeds: {', '.join(str(s) for s in record['seeds'])}. Reference of the change table: "
        f"`{summary['reference']}`. Headline: `{summary['decision']['candidate']}` vs "
        f"`{summary['decision']['reference']}`. Cells finished: {len(rows)} of "
        f"{len(record['configurations']) * len(record['seeds'])}. Generated from `results.jsonl` "
        f"(regenerate with `lmlab report {run.root}`).",
        "",
        "## Decision",
        "",
        summary["decision"]["text"],
        "",
    ]
    if summary["comparisons"]:
        lines += ["## Attribution: each component against the configuration it is added to, and its controls", "",
                  *attribution_table(summary), "", *[f"- {c['text']}" for c in summary["comparisons"]], "",
                  "Labels and columns:", "", *attribution.LEGEND, ""]
    invalid = [n for n, e in summary["configs"].items() if e.get("invalid")]
    lines += ["## Results (mean ± std over seeds)", "", *main_table(summary, metrics), ""]
    if invalid:
        lines += [f"Configurations marked INVALID ({', '.join(f'`{n}`' for n in invalid)}) are diagnostics: they "
                  "reproduce a flaw of the original code to measure what it did; they are never a candidate, a "
                  "reference or a control, and no decision uses them.", ""]
    lines += [
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
    if summary.get("claims"):
        lines += ["## Claims of the research notes vs this run", "",
                  "Each claim as the notes made it, what this run measured (improvement in %, positive = better, "
                  "95% interval over seeds) and a verdict: supported (the interval excludes 0 on the claimed side), "
                  "not supported (it excludes 0 on the other side, or excludes the claimed size), or not testable at "
                  "this scale (it holds both 0 and the claimed size).", "", *claims_table(summary), ""]
    atomic_write_text(run.root / "report.md", "\n".join(lines))
    return summary


def regenerate(directory: Path) -> Path:
    run = RunDir(directory)
    write_reports(run)
    return run.root
