"""Reports generated from data: summary.json, report.md, report.tex, results.csv and plots.

Everything here is a function of `study.yaml`, `results.jsonl` and the cells' `metrics.jsonl`, so
`lmlab report DIR` reproduces a finished run's summary exactly.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import textwrap
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from lmlab import stats
from lmlab.studies import attribution, registry
from lmlab.studies.rundir import RunDir, atomic_write_text, json_safe
from lmlab.studies.setting import section as setting_section

LOWER_IS_BETTER_HINTS = ("ppl", "bpb", "loss", "time", "mem", "latency", "invalid", "kv_bytes", "prompt_tokens")


def lower_is_better(metric: str) -> bool:
    leaf = metric.rsplit("/", 1)[-1]
    if leaf.endswith("_saved") or leaf.startswith("acc") or "per_s" in leaf or "compression" in leaf:
        return False
    return any(h in leaf for h in LOWER_IS_BETTER_HINTS)


def secondary_sentence(summary: dict, rows: list[dict], metrics: list[str]) -> str:
    """The decision's pair on the run's other quality metrics (`metrics` less the primary one and timings): which
    differ significantly, each with its interval, and which do not - so a null on the primary metric is not read as
    "no difference" where another metric differs. Each at 95%, uncorrected, and secondary: the decision stays on the
    primary metric. "" without such metrics or paired values."""
    decision = summary.get("decision") or {}
    candidate, reference, primary = decision.get("candidate"), decision.get("reference"), decision.get("metric")
    others = [m for m in metrics if m != primary and not any(h in m for h in ("time", "per_s", "mem"))]
    if not candidate or not reference or not others:
        return ""
    values = attribution.per_seed_values(rows)
    copies = [m for m in others if _same_in_every_cell(rows, m, primary)]
    differ, same, resolution = [], [], []
    for metric in others:
        effect = attribution.improvement(values, candidate, reference, metric, lower_is_better(metric))
        if metric in copies or effect is None or not effect.get("ci95"):
            continue
        if attribution.below_resolution(effect):
            resolution.append(f"`{metric}`")
        elif attribution.significant_gain(effect) or attribution.significant_loss(effect):
            differ.append(f"`{metric}` {attribution.effect_text(effect)}")
        else:
            same.append(f"`{metric}`")
    named = " and ".join(f"`{m}`" for m in copies)
    copied = (f"{named} equal{'s' if len(copies) == 1 else ''} `{primary}` in every cell, so "
              f"{'it adds' if len(copies) == 1 else 'they add'} nothing" if copies else "")
    if not differ and not same and not resolution:
        return (f"The run's other metric{'s' if len(copies) > 1 else ''}, {copied.replace(' equal', ', equal', 1)} "
                "to the decision." if copies else "")
    count = len(differ) + len(same) + len(resolution)
    named_count = count + len(copies)
    parts = differ + ([f"no significant difference on {', '.join(same)}"] if same else []) + (
        [f"the same to the metric's resolution on {', '.join(resolution)}"] if resolution else []) + (
        [copied] if copied else [])
    return (f"`{candidate}` vs `{reference}` on the run's other metric{'s' if named_count > 1 else ''} (secondary: "
            + (f"each at 95%, uncorrected for the {count} compared" if count > 1 else "at 95%")
            + f"; the decision and its controls are judged on {primary} alone): " + "; ".join(parts) + ".")


def _same_in_every_cell(rows: list[dict], metric: str, primary: str) -> bool:
    """Whether `metric` equals `primary` in every finished cell that recorded `primary` (and at least one did; a
    cell without `metric` breaks it): a second name for the same numbers, e.g. a strict accuracy where no answer
    was invalid."""
    with_primary = [r for r in rows if r.get("status", "ok") == "ok" and r.get("metrics", {}).get(primary) is not None]
    return bool(with_primary) and all(r["metrics"].get(metric) == r["metrics"][primary] for r in with_primary)


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


def config_value(config: dict, path: str):
    """A dotted path's value in a recorded configuration (None where it has none)."""
    value = config
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def with_scale(row: dict, spec: dict, config: dict, configs: dict | None = None) -> dict:
    """A claim row whose setting column also says where this run's scale differs from the notes': a claim spec's
    `scale` lists [config path, the notes' value, what it counts] (e.g. ["adapter.num_landmarks", 4, "landmarks"],
    or the notes' value in their own unit: ["num_train", "200 samples", "packed training windows"]);
    the path "component_params" reads the claim's candidate's measured component parameters from `configs`
    (the summary's per-configuration entries) instead of the configuration."""
    differs = []
    for path, notes, what in spec.get("scale", []):
        if path == "component_params":
            ours = (configs or {}).get(spec.get("candidate"), {}).get("component_params")
        else:
            ours = config_value(config, path)
        if ours is not None and ours != notes:
            if ours == "builtin":  # lmlab's own tiny base or generated data, not a name a reader can look up
                ours = "built here" if path == "model" else "generated here"
            # a count reads "400 epochs"; a name "base model built here"; the notes' value as they give it
            differs.append(f"{what} {ours} (the notes: {notes})" if isinstance(ours, str) else
                           f"{fmt(ours)} {what} (the notes: {notes if isinstance(notes, str) else fmt(notes)})")
    if differs:
        row = {**row, "setting": f"{row['setting']}; this run differs: {', '.join(differs)}",
               "setting_differs": differs}
    return row


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
    specs = comparison_specs(record)
    if ratio is not None:  # a candidate the run finds not parameter-matched needs a control that is
        matched = {name: e.get("param_matched") for name, e in summary_configs.items()}
        specs = [attribution.needs_parameter_match(spec, matched, params, ratio) for spec in specs]
    comparisons = [attribution.judge_comparison(spec, values, params, roles, primary, primary_lower)
                   for spec in specs]
    for comp in comparisons:  # a configuration's decision is that of the comparison it is the candidate of
        entry = summary_configs[comp["candidate"]]
        if "decision" not in entry:
            entry["decision"] = attribution.decision_record(comp, comp["candidate"], comp["parent"], primary)
            if comp["params_per_pct"] is not None:
                entry["efficiency_params_per_pct"] = comp["params_per_pct"]
    headline = next((c for c in comparisons if c["headline"]), None)
    declared = next((c for c in record.get("comparisons", []) if c.get("headline")), None)
    headline_parent = reference  # the change tables stay vs the reference; the decision names the declared headline
    if headline is None and declared is not None:  # the headline's configurations were not all selected (only=)
        candidate, headline_parent = declared["candidate"], declared["parent"]
    missing = [c for c in (candidate, headline_parent) if c not in configs]
    claims = [with_scale(attribution.judge_claim(spec, values, comparisons, primary_lower), spec,
                         record.get("config", {}), summary_configs) for spec in record.get("claims", [])]
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
        "decision": attribution.decision_record(headline,
                                                headline["candidate"] if headline else candidate,
                                                headline["parent"] if headline else headline_parent, primary,
                                                missing),
        "failed_cells": failed,
    }
    if record.get("setting"):
        summary["setting"] = record["setting"]
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
    if desc["std"] == 0:  # a measurement every seed shares (a text-only baseline, a count): no spread to show
        return f"{fmt(desc['mean'])} (same on every seed)"
    return mean_pm_std(desc["mean"], desc["std"])


def mean_text(desc: dict | None) -> str:
    """A configuration's mean over seeds alone, to the decimals its spread shows (as in `mean_pm_std`)."""
    if not desc or desc.get("mean") is None:
        return "-"
    if not desc.get("std"):
        return fmt(desc["mean"])
    return mean_pm_std(desc["mean"], desc["std"]).split(" ± ")[0]


def interval_text(lo: float, hi: float) -> str:
    """'[10.4, 11.6]': an interval's ends to the decimals that show two significant digits of its width (trailing
    zeros kept: [9.80, 10.05], not [9.8, 10.05])."""
    width = abs(hi - lo)
    digits = min(6, max(0, 1 - math.floor(math.log10(width)))) if width > 0 and math.isfinite(width) else 2
    return f"[{lo:,.{digits}f}, {hi:,.{digits}f}]"


def mean_pm_std(mean: float, std: float) -> str:
    """'mean ± std' with the std to two significant figures (trailing zeros kept: 0.020, not 0.02) and the mean to at
    least as many decimals as the std shows, so that 10.0009 ± 0.53 prints as 10.00 ± 0.53, not 10 ± 0.53."""
    if not (math.isfinite(mean) and math.isfinite(std)) or std <= 0:
        return f"{fmt(mean)} ± {fmt(std, 2)}"
    if std >= 9.95:  # two significant figures of a spread of 10 or more: whole numbers (470, 1,200)
        std_text, decimals = f"{float(f'{std:.2g}'):,.0f}", 0
    elif std < 1e-3:
        std_text, decimals = fmt(std, 2), min(6, 1 - math.floor(math.log10(std)))
    else:
        std_text = f"{std:#.2g}".rstrip(".")
        decimals = len(std_text.split(".")[1]) if "." in std_text else 0
    mean_text = fmt(mean)
    shown = len(mean_text.split(".")[1]) if "." in mean_text else 0
    if "e" not in mean_text and shown < decimals:
        mean_text = f"{mean:,.{decimals}f}"
    return f"{mean_text} ± {std_text}"


def change_cell(change: dict | None) -> str:
    """A change-table cell: '+1.23% [+0.50, +1.96] (p=0.012)', or the shared measurement without an interval; with
    as many decimals as the interval's width needs (a change of -0.004% does not print as -0.00%)."""
    if not change:
        return "-"
    digits = attribution.decimals(change)
    if change.get("constant"):
        return f"{attribution.signed(change['delta_pct'], digits)}% (one shared measurement, no interval)"
    ci = change.get("ci95")
    ci_text = f" [{attribution.signed(ci[0], digits)}, {attribution.signed(ci[1], digits)}]" if ci else ""
    p = change.get("p_value")
    return f"{attribution.signed(change['delta_pct'], digits)}%{ci_text}" + (f" (p={p:.2g})" if p is not None else "")


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
    ref_metrics = summary["configs"].get(ref, {}).get("metrics", {})
    for name, entry in summary["configs"].items():
        if name == ref:
            continue
        cells = [config_label(name, entry, summary)]
        for m in metrics:
            change = entry["vs_reference"].get(m)
            if change is None and entry["metrics"].get(m, {}).get("n") and \
                    ref_metrics.get(m, {}).get("values") and not any(ref_metrics[m]["values"]):
                both = not any(entry["metrics"][m]["values"])
                cells.append("0 on both: no change" if both else f"undefined: `{ref}` is 0 on every seed")
            else:
                cells.append(change_cell(change))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def attribution_table(summary: dict) -> list[str]:
    """One row per comparison: the component's effect vs its parent and vs its controls, label, params per 1%."""
    header = ["component", "candidate", "added to", "params added", "change vs parent [95% CI] (p)",
              "change vs controls [95% CI]", "decision", "params per 1%"]
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


def lm_eval_section(summary: dict) -> list[str]:
    """The lm-evaluation-harness scores of the cells (metrics `lm_eval/<task>/<metric>`, a study's `lm_eval:` field):
    mean ± std per configuration and the paired change vs the reference; nothing when no cell has them."""
    names = [m for m in dict.fromkeys(m for e in summary["configs"].values() for m in e["metrics"])
             if m.startswith("lm_eval/")]
    if not names:
        return []
    shown = [m[len("lm_eval/"):] for m in names]
    lines = ["## lm-evaluation-harness", "",
             "Each finished cell's final model scored by lm-evaluation-harness (lm-eval's own tasks and metrics, "
             "metrics `lm_eval/<task>/<metric>` in `results.jsonl`), mean ± std over seeds:", "",
             "| configuration | " + " | ".join(shown) + " |", "|" + "---|" * (len(names) + 1)]
    for name, entry in summary["configs"].items():
        lines.append("| " + " | ".join([config_label(name, entry, summary),
                                        *[_mean_std(entry["metrics"].get(m)) for m in names]]) + " |")
    table = change_table(summary, names)
    table[0] = "| configuration | " + " | ".join(f"{m} change vs {summary['reference']} [95% CI] (p)"
                                                 for m in shown) + " |"
    return [*lines, "", "Paired change vs the reference (as in the change table above):", "", *table, ""]


# A claim verdict opens with one of these (attribution.judge_claim), then ': ' and its reasons; the longest first
VERDICT_LABELS = ("not supported as the component's effect", "not supported at this scale",
                  "not supported at this budget", "supported at this budget", "not testable at this scale",
                  "not testable here", "partly supported", "not supported", "supported")


def verdict_label(verdict: str) -> str:
    """The label a claim's verdict opens with ('not testable at this scale', before ': ' or ' ('), or the whole
    verdict if it opens with none."""
    return next((label for label in VERDICT_LABELS if verdict == label or verdict.startswith((label + ":",
                                                                                             label + " ("))), verdict)


def claims_table(summary: dict) -> list[str]:
    """The claims as a table a reader can scan - the claim, the notes' setting, what this run measured and the
    verdict's label - then each verdict in full, with its reasons, as a list under the table."""
    claims = summary.get("claims", [])
    lines = ["| # | claim | setting in the notes | what this run measured (95% CI) | verdict (reasons below) |",
             "|---|---|---|---|---|"]
    for i, c in enumerate(claims, 1):
        lines.append(f"| {i} | {c['id']}: {c['claim']} | {c['setting']} | {c['measured']} | "
                     f"**{verdict_label(c['verdict'])}** |".replace("\n", " "))
    lines += ["", "Each verdict in full:", ""]
    for i, c in enumerate(claims, 1):
        verdict = c["verdict"] + (f". Known explanation - {c['explanation']}" if c.get("explanation") else "")
        lines.append(f"{i}. {c['id']}: {verdict}".replace("\n", " "))
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


# Characters LaTeX treats as commands (or prints wrongly in its default font encoding), and the non-ASCII text of
# decisions and captions, as pdflatex input that needs no package beyond booktabs.
TEX_REPLACEMENTS = {
    "\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#", "%": r"\%", "_": r"\_",
    "^": r"\textasciicircum{}", "~": r"\textasciitilde{}", "<": r"\textless{}", ">": r"\textgreater{}",
    "|": r"\textbar{}", '"': "''", "Δ": r"$\Delta$", "±": r"$\pm$", "≤": r"$\leq$", "≥": r"$\geq$",
    "×": r"$\times$", "≈": r"$\approx$", "≠": r"$\neq$", "→": r"$\rightarrow$", "←": r"$\leftarrow$",
    "·": r"$\cdot$", "√": r"$\surd$", "∞": r"$\infty$", "μ": r"$\mu$", "µ": r"$\mu$", "°": r"$^\circ$",
    "−": "-", "–": "--", "—": "---", "…": r"\ldots{}", "‘": "`", "’": "'", "“": "``", "”": "''", "\u00a0": "~",
}


def _tex_escape(text: str) -> str:
    """`text` as LaTeX source that prints it: specials escaped, markdown `code` as \\texttt, every non-ASCII character
    spelled in ASCII (its LaTeX symbol, its unaccented letter, or [U+XXXX]), so report.tex never fails to compile
    on a configuration name or a decision's wording."""
    parts = re.split(r"`([^`]*)`", text)  # odd indices: the contents of markdown code spans
    return "".join(rf"\texttt{{{_tex_chars(part)}}}" if i % 2 else _tex_chars(part) for i, part in enumerate(parts))


def _tex_chars(text: str) -> str:
    """The characters of `text` as LaTeX, one at a time, so no replacement is escaped twice."""
    out = []
    for char in text:
        if char in TEX_REPLACEMENTS:
            out.append(TEX_REPLACEMENTS[char])
        elif char.isascii():
            out.append(char)
        else:
            plain = unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode()
            out.append(_tex_chars(plain) if plain else f"[U+{ord(char):04X}]")
    return "".join(out)


TEX_NEEDS = r"% requires \usepackage{booktabs}; report_standalone.tex is this table as a complete document"
TEX_STACK = (r"\begin{tabular}[b]{@{}c@{}}", r"\end{tabular}")  # a table cell of several centred lines


def _tex_header(text: str) -> str:
    """A column heading stacked over lines at its '/' and ' vs ' (metric names are long, their values short), with a
    plain nested tabular, so it needs no package."""
    parts = [p for p in re.split(r"(?<=/)| (?=vs )", text) if p]
    if len(parts) == 1:
        return _tex_escape(text)
    return TEX_STACK[0] + r" \\ ".join(_tex_escape(p) for p in parts) + TEX_STACK[1]


def _tex_width_cm(rows: list[list[str]]) -> float:
    """About how wide a table of these LaTeX cells prints in \\small (0.17 cm per visible character, 4pt of padding
    either side of a column), for a page that fits it."""
    def visible(cell: str) -> int:
        lines = cell.replace(TEX_STACK[0], "").replace(TEX_STACK[1], "").split(r" \\ ")
        return max(len(re.sub(r"\\[a-zA-Z]+|[{}$\\]", "", line)) for line in lines)

    visible_lengths = [[visible(cell) for cell in row] for row in rows]
    return sum(0.17 * max(column) + 0.28 for column in zip(*visible_lengths, strict=True))


def write_tex(run: RunDir, summary: dict, metrics: list[str]) -> None:
    """report.tex, the results table as a fragment to \\input into a paper (it needs booktabs, as its first line
    says), and report_standalone.tex, the same table as a complete document that pdflatex compiles as it is, on a
    landscape page widened where the table needs it."""
    ref = summary["reference"]
    primary = summary["primary_metric"]
    header = ["Configuration", *[_tex_header(m) for m in metrics], _tex_header(f"Δ{primary} vs {ref}"), "Params"]
    rows = []
    for name, entry in summary["configs"].items():
        vals = []
        for m in metrics:
            d = entry["metrics"].get(m)
            if not d or d.get("mean") is None:
                vals.append("--")
            elif d.get("std") is None:
                vals.append(_tex_escape(fmt(d["mean"])))
            else:
                vals.append(rf"{_tex_escape(fmt(d['mean']))} $\pm$ {_tex_escape(fmt(d['std'], 2))}")
        ch = entry["vs_reference"].get(primary)
        delta = "--" if not ch else (rf"{ch['delta_pct']:+.2f}\%" +
                                     (rf" [{ch['ci95'][0]:+.2f}, {ch['ci95'][1]:+.2f}]" if ch.get("ci95") else ""))
        rows.append([_tex_escape(name), *vals, delta, _tex_escape(fmt(entry["trainable_params"]))])
    table = [r"\begin{table}[t]", r"\centering", r"\small", r"\setlength{\tabcolsep}{4pt}",
             rf"\begin{{tabular}}{{l{'r' * (len(header) - 1)}}}", r"\toprule", " & ".join(header) + r" \\",
             r"\midrule", *[" & ".join(row) + r" \\" for row in rows], r"\bottomrule", r"\end{tabular}",
             rf"\caption{{{_tex_escape(summary['study'])} ({_tex_escape(summary['preset'])} preset), mean $\pm$ std "
             rf"over seeds {', '.join(str(s) for s in summary['seeds'])}; relative change vs {_tex_escape(ref)} "
             rf"(geometric mean over seeds) with its 95\% interval on the log scale. "
             rf"{_tex_escape(summary['decision']['text'])}}}",
             r"\end{table}"]
    width = max(29.7, _tex_width_cm([header, *rows]) + 3.5)  # A4 landscape, or wider with 1.5 cm margins
    preamble = [r"\documentclass{article}", r"\usepackage[T1]{fontenc}", r"\usepackage{booktabs}",
                rf"\usepackage[paperwidth={width:.1f}cm,paperheight=21cm,margin=1.5cm]{{geometry}}",
                r"\begin{document}"]
    atomic_write_text(run.root / "report.tex", "\n".join([TEX_NEEDS, *table, ""]))
    atomic_write_text(run.root / "report_standalone.tex", "\n".join([*preamble, *table, r"\end{document}", ""]))


def second_half_start(steps: list[int]) -> int:
    """The first of `steps` (sorted, at least two) at or after half the last one: where "the second half of the run"
    starts for a trend read from evaluations (the last step's predecessor if no other step qualifies)."""
    middle = next(step for step in steps if step >= steps[-1] / 2)
    return steps[-2] if middle == steps[-1] else middle


def _cell_stages(run: RunDir, config: str):
    """(seed, offset, records) per stage of each of `config`'s cells, in training order: the earlier stages'
    `metrics-<stage>.jsonl` (name order), then `metrics.jsonl`; `offset` is the optimizer steps of the stages before
    (each stage's step count starts again at 1), so offset + step numbers a cell's whole training."""
    for cell in sorted((run.root / "cells" / config).glob("seed-*")):
        offset = 0
        for metrics_file in [*sorted(cell.glob("metrics-*.jsonl")), cell / "metrics.jsonl"]:
            if not metrics_file.is_file():
                continue
            records = [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines()
                       if line.strip()]
            yield int(cell.name.removeprefix("seed-")), offset, records
            offset += max((rec.get("step") or 0 for rec in records), default=0)


def stage_starts(run: RunDir, config: str) -> list[int]:
    """The optimizer steps (as `seed_curves` numbers them) after which a cell of `config` that trained in stages
    started each later stage: where its plotted curve changes what trains. Empty for a cell of one stage."""
    return sorted({offset for _, offset, _ in _cell_stages(run, config) if offset})


def seed_curves(run: RunDir, config: str, kind: str, key: str) -> dict[int, dict[int, list[float]]]:
    """{seed: {step: [values]}} of `key` in one configuration's cells' metrics.jsonl records of `kind`. A cell that
    trained in stages keeps its earlier stages' curves in `metrics-<stage>.jsonl` (name order): they come first, and
    each later stage's steps continue after the steps before it, so the curve shows the whole training of the cell."""
    curves: dict[int, dict[int, list[float]]] = {}
    for seed, offset, records in _cell_stages(run, config):
        for rec in records:
            if rec.get("kind") == kind and rec.get(key) is not None:
                curves.setdefault(seed, {}).setdefault(offset + rec["step"], []).append(rec[key])
    return curves


def cell_curves(run: RunDir, configs: list[str], kind: str, key: str) -> dict[str, dict[int, list[float]]]:
    """{config: {step: [value per seed]}} of `key` in the cells' metrics.jsonl records of `kind` (`seed_curves`)."""
    curves: dict[str, dict[int, list[float]]] = {}
    for config in configs:
        for curve in seed_curves(run, config, kind, key).values():
            for step, values in curve.items():
                curves.setdefault(config, {}).setdefault(step, []).extend(values)
    return curves


class Curve(NamedTuple):
    """One plotted series: y against x and, where y is a mean over `seeds` seeds, the lowest and highest seed's value
    at each x (`line_plot` shades the band between them), so a figure shows how far the seeds disagree."""

    x: list
    y: list
    low: list | None = None
    high: list | None = None
    seeds: int = 1


def curve_over_seeds(x: list, per_seed: list[list[float | None]]) -> Curve:
    """The mean, min and max over seeds at each x of per-seed value lists aligned with x (None: no value there)."""
    columns = [[v for v in values if v is not None] for values in zip(*per_seed, strict=True)]
    return Curve(x, [sum(c) / len(c) if c else None for c in columns], [min(c) if c else None for c in columns],
                 [max(c) if c else None for c in columns], len(per_seed))


def detail_curves(rows: list[dict], configs: list[str], key: str, x: list) -> dict[str, Curve]:
    """{config: Curve over x} of the per-seed value lists that result rows keep in details[key] (one value per x),
    for the configurations of `configs` that have them."""
    curves = {}
    for config in configs:
        per_seed = [r["details"][key] for r in rows if r["config"] == config and r["details"].get(key)]
        if per_seed:
            curves[config] = curve_over_seeds(x, per_seed)
    return curves


def mean_over_seeds(curves: dict[str, dict[int, list[float]]]) -> dict[str, Curve]:
    """{config: Curve over its steps: mean, min and max over seeds} from `cell_curves` (a seed that stopped early
    leaves the later steps to the others)."""
    out = {}
    for config, points in curves.items():
        steps = sorted(points)
        out[config] = Curve(steps, [sum(points[s]) / len(points[s]) for s in steps], [min(points[s]) for s in steps],
                            [max(points[s]) for s in steps], max(len(v) for v in points.values()))
    return out


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*", "d")
LINE_STYLES = ("-", "--", "-.", ":")


# Distinct colours for configurations: Trubetskoy's 20 distinct colours without the greys and the shades too light to
# see on white, then tuned so that no two are closer than 21 in CIEDE2000 (the eye's colour difference; Trubetskoy's
# own lime / green, pink / lavender and brown / dark gold were 15-18 apart): blue, orange, green, red, purple, brown,
# magenta, teal, olive, sky blue, maroon, navy, periwinkle, rose, forest green, tan. Small studies use the first,
# most distinct ones.
PALETTE = ("#4363d8", "#f58231", "#3cb44b", "#e6194b", "#911eb4", "#965a0f", "#ff3cff", "#469990", "#808000",
           "#19b4f0", "#800000", "#000075", "#a5a5e1", "#e196a5", "#1e6432", "#d2b469")


def config_styles(configs: list[str]) -> dict[str, dict]:
    """Matplotlib style (color, marker, linestyle) of each configuration, from its position in `configs`: pass the
    run's full configuration list (study.yaml's `configurations`), so a configuration looks the same in every plot
    of a run whichever subset of configurations a plot shows. Colour, marker shape and line style all change from
    one configuration to the next, so two configurations with the same values stay distinguishable (hollow markers
    of different shapes, interleaved dashes) and the plots stay readable in greyscale. The colours are PALETTE: sixteen
    colours at least 21 apart in CIEDE2000 (tab20's light and dark shades of one hue had paired up a study's sixteen
    configurations; a few neighbours here, such as blue and navy, still share a hue and differ in lightness) and no
    grey, which plots keep for references (initial values, text baselines)."""
    colours = PALETTE
    return {name: {"color": colours[i % len(colours)], "marker": MARKERS[i % len(MARKERS)],
                   "linestyle": LINE_STYLES[i % len(LINE_STYLES)]} for i, name in enumerate(configs)}


def same_values_notes(series: dict[str, tuple]) -> dict[str, str]:
    """{name: ' [same values as NAME]'} for each series whose points equal an earlier series', so the legend says why
    a series drawn exactly under another one cannot be seen apart from it."""
    first: dict[tuple, str] = {}
    notes = {}
    for name, points in series.items():
        key = tuple(tuple(p) for p in points)
        if key in first:
            notes[name] = f" [same values as {first[key]}]"
        else:
            first[key] = name
    return notes


def band_note(seeds: int) -> str:
    """What a plot's shaded bands are, for its legend title."""
    return f"shaded: min-max over {seeds} seeds"


def close_groups(series: dict[str, Curve], close: float, log: bool = False) -> dict[str, list[tuple[str, float]]]:
    """{first: [(other, largest distance), ...]}: each series whose mean lies within `close` of an earlier series' at
    every x (the same x, gaps in the same places) joins that one's group; distance 0 is the same values. On a log
    axis (`log`) the distance is |log10(a / b)|. Series in no other's group map to an empty list."""
    def distance(a: Curve, b: Curve) -> float | None:
        if a.x != b.x or [v is None for v in a.y] != [v is None for v in b.y]:
            return None
        gaps = [abs(math.log10(u / v)) if log else abs(u - v) for u, v in zip(a.y, b.y, strict=True)
                if u is not None and v is not None]
        return max(gaps, default=0.0)

    groups: dict[str, list[tuple[str, float]]] = {}
    for name, curve in series.items():
        for first, members in groups.items():
            d = distance(series[first], curve)
            if d is not None and d <= close:
                members.append((name, d))
                break
        else:
            groups[name] = []
    return groups


def _envelope(curves: list[Curve]) -> tuple[list, list]:
    """The lowest low and highest high at each x over curves of the same x (None where every curve has none)."""
    lows = [[v for v in vs if v is not None] for vs in zip(*[c.low or c.y for c in curves], strict=True)]
    highs = [[v for v in vs if v is not None] for vs in zip(*[c.high or c.y for c in curves], strict=True)]
    return [min(v) if v else None for v in lows], [max(v) if v else None for v in highs]


LINE_WIDTHS_CLOSE = 60  # means closer than 1/60 of the y axis (about a line's width) at every x are drawn as one line


def line_plot(run: RunDir, name: str, series: dict[str, Curve], *, styles: dict[str, dict], xlabel: str,
              ylabel: str, title: str, logy: bool = False, unit_y: bool = False, integer_x: bool = False,
              shade: tuple[float, float, str] | None = None, hline: tuple[float, str] | None = None,
              vlines: list[tuple[float, str, str]] = ()) -> str:
    """One line per series in its style from `styles` (`config_styles`; None values become gaps), its seed band
    shaded, saved as plots/<name> (PNG and PDF); returns the PNG's relative path. `unit_y` fixes the y axis to
    [0, 1] (accuracies), `integer_x` puts ticks on whole numbers only (optimizer steps), `logy` is a log axis with
    plain tick labels, `hline` (y, label) a dashed reference line (e.g. chance), `vlines` [(x, colour, label)] dotted
    vertical markers (e.g. where a configuration's second stage starts).

    Series whose means lie within about a line's width of an earlier one's at every x (1/LINE_WIDTHS_CLOSE of the y
    axis) would be drawn on top of it, and their bands would stack: they are drawn as that one line, its band spanning
    all their seeds, and a note under the legend names each with how far it lies from the line (or that it has the
    same values) - a plot of sixteen configurations of which ten nearly coincide stays readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = [v for c in series.values() for vs in (c.y, c.low or [], c.high or []) for v in vs
              if v is not None and (v > 0 or not logy)]
    span = 1.0 if unit_y else (math.log10(max(values) / min(values)) if logy else max(values) - min(values)) \
        if values else 0.0
    groups = close_groups(series, span / LINE_WIDTHS_CLOSE, log=logy)
    seeds = max((c.seeds for c in series.values() if c.low is not None), default=1)
    band_alpha = min(0.2, 1.2 / len(groups)) if groups else 0.2  # lighter bands where many overlap
    for label, members in groups.items():
        curve, style = series[label], styles[label]
        shown = f"{label} [and {len(members)} more, listed below]" if members else label
        # markers on at most ~15 points per line; unclipped on a [0, 1] axis, where 0 and 1 lie on its edges
        ax.plot(curve.x, _gaps(curve.y), label=shown, fillstyle="none", markersize=6,
                markevery=max(1, len(curve.x) // 15), clip_on=not unit_y, **style)
        if curve.low is not None and max(series[m].seeds for m in [label, *(n for n, _ in members)]) > 1:
            low, high = _envelope([curve, *(series[n] for n, _ in members)])
            ax.fill_between(curve.x, _gaps(low), _gaps(high), color=style["color"], alpha=band_alpha, linewidth=0)
    if shade is not None:
        ax.axvspan(shade[0], shade[1], color="grey", alpha=0.1, label=shade[2])
    if hline is not None:
        ax.axhline(hline[0], color="black", linestyle=(0, (4, 3)), linewidth=0.9, label=hline[1])
    for x, colour, label in vlines:
        ax.axvline(x, color=colour, linestyle=":", linewidth=1.2,
                   label=textwrap.fill(label, 48, subsequent_indent="  ", break_on_hyphens=False))
    if unit_y:
        ax.set_ylim(0, 1)
    if integer_x:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    if logy:
        plain_log_y(ax)
    label_axes(ax, xlabel=xlabel, ylabel=ylabel, title=title, legend_title=band_note(seeds) if seeds > 1 else None)
    said = [_group_note(label, members, logy) for label, members in groups.items() if members]
    if said:
        _note_under_legend(ax, ["Drawn as one line (band: all their seeds):", *said])
    return save_figure(fig, run, name)


def _group_note(label: str, members: list[tuple[str, float]], log: bool) -> str:
    """'rslora, and on its line:' then one member a line: 'rslora+bias (the same values)', 'rslora+constant (within
    0.0042)' - the largest distance of its mean from the line's over x (on a log axis, in %)."""
    def how(d: float) -> str:
        if not d:
            return "the same values"
        return f"within {100 * (10 ** d - 1):.2g}%" if log else f"within {d:.2g}"

    return "\n".join([f"{label}, and on its line:", *(f"  {n} ({how(d)})" for n, d in members)])


def _note_under_legend(ax, paragraphs: list[str]) -> None:
    """Text in the figure's right margin just below the axes' legend (lined up with it), so it never covers the data
    or the legend; the saved figure's tight bounding box grows to hold it."""
    fig = ax.get_figure()
    legend = ax.get_legend()
    renderer = fig.canvas.get_renderer()
    top = 1.0
    if legend is not None:
        box = legend.get_window_extent(renderer).transformed(ax.transAxes.inverted())
        top = box.y0 - 0.03
    lines = [textwrap.fill(line, 48, subsequent_indent="    ", break_on_hyphens=False)
             for p in paragraphs for line in p.split("\n")]
    ax.text(1.02, top, "\n".join(lines),
            transform=ax.transAxes, fontsize=8, va="top", ha="left")


def _gaps(values: list) -> list[float]:
    """None (no value at that x) as NaN, which matplotlib leaves as a gap in a line or band."""
    return [float("nan") if v is None else v for v in values]


def plain_number(value: float, _position=None) -> str:
    """A tick label as a plain number: 20, 1,500, 0.05 (never 2x10^1)."""
    return f"{value:,.0f}" if abs(value) >= 1 and value == round(value) else f"{value:g}"


def plain_log_y(ax) -> None:
    """A log y axis labelled with plain numbers (20, 50, 100; not 2x10^1 or 10^2): over less than a decade, where a
    log axis has few or no labelled ticks, at round linear steps; over up to three decades at 1, 2 and 5 per decade;
    beyond, at powers of 10. Call it after plotting, as it reads the data's range."""
    from matplotlib import ticker

    ax.set_yscale("log")
    low, high = ax.get_ylim()
    decades = math.log10(high / low)
    if decades < 1:
        ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    else:
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 3 else (1.0,)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(plain_number))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def label_axes(ax, *, xlabel: str, ylabel: str, title: str, legend: bool = True,
               legend_title: str | None = None) -> None:
    """The labels, title, legend and grid every report plot has. The title and y label wrap to the axes' size and the
    legend goes outside, to the right of the axes (save_figure's tight bounding box keeps it), so neither is clipped
    and the legend never covers data; `legend=False` leaves the legend to the caller (a figure-wide one)."""
    fig = ax.get_figure()
    box = ax.get_position()
    width_in, height_in = box.width * fig.get_figwidth(), box.height * fig.get_figheight()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(textwrap.fill(ylabel, _chars_fitting(height_in, ax.yaxis.label.get_fontsize())))
    ax.set_title(textwrap.fill(title, _chars_fitting(width_in, ax.title.get_fontsize())))
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, frameon=False,
                  title=legend_title, title_fontsize=8, alignment="left")
    ax.grid(alpha=0.3)


def _chars_fitting(inches: float, fontsize: float) -> int:
    """About how many characters of text at `fontsize` points fit in `inches` (an average glyph: 0.55 em)."""
    return max(20, int(inches * 72 / (0.55 * fontsize)))


def training_curves_plot(run: RunDir, configs: list[str], invalid: set[str] = frozenset(),
                         stages: dict[str, str] | None = None) -> str | None:
    """Training loss against optimizer step, one line per configuration of `configs` (the run's full list, which fixes
    the colours): the mean over seeds, shaded between the lowest and highest seed. The loss is the language-model
    NLL the cells log (`nll`), the same quantity for every configuration where some add auxiliary terms to what they
    optimise (LatentWire's InfoNCE); `loss` where the cells log no NLL. A configuration in `invalid` (a diagnostic) is
    labelled so. A configuration whose cells trained in stages gets a dotted line in its colour where each later
    stage starts (`stage_starts`): the last one labelled with what that stage trains (`stages`: {configuration:
    what}), any earlier one 'its next stage'."""
    losses = cell_curves(run, configs, "train", "loss")
    nlls = cell_curves(run, configs, "train", "nll")
    curves, what = (nlls, "training NLL, the language-model loss without auxiliary terms") \
        if nlls and set(nlls) == set(losses) else (losses, "training loss")
    if not curves:
        return None
    label = {c: f"{c} (INVALID)" if c in invalid else c for c in configs}
    styles = config_styles(configs)
    vlines = []
    for c in (c for c in configs if c in curves):
        starts = stage_starts(run, c)
        vlines += [(step, styles[c]["color"], f"{label[c]}: from here, "
                    f"{(stages or {}).get(c, 'its next stage') if step == starts[-1] else 'its next stage'}")
                   for step in starts]
    return line_plot(run, "training_curves.png", {label[c]: v for c, v in mean_over_seeds(curves).items()},
                     styles={label[c]: v for c, v in styles.items()}, xlabel="optimizer step",
                     ylabel=f"{what} (mean over seeds)", title="Training curves", integer_x=True, vlines=vlines)


def save_figure(fig, run: RunDir, name: str) -> str:
    """Save `fig` as plots/<name> (PNG, for report.md) and beside it as a vector PDF of the same name (for papers,
    fonts embedded as TrueType and no creation date, so a regenerated report writes the same file), each atomically.
    The saved area is the tight bounding box of everything drawn, so a legend outside the axes widens the image
    rather than shrinking the axes (figures with several axes lay themselves out first); it is measured once for
    both files (each `bbox_inches="tight"` save would lay the figure out again: a fifth of the saving time). Returns
    the PNG's path."""
    import matplotlib
    import matplotlib.pyplot as plt

    stem = Path(name).stem
    run.plots.mkdir(parents=True, exist_ok=True)
    try:
        with matplotlib.rc_context({"pdf.fonttype": 42}):
            if fig.get_layout_engine() is not None:  # a constrained layout places the axes when drawn: before measuring
                fig.draw_without_rendering()
            bbox = fig.get_tightbbox(fig.canvas.get_renderer()).padded(0.05)
            for ext, options in (("png", {"dpi": 150}), ("pdf", {"metadata": {"CreationDate": None}})):
                tmp = run.plots / f".{stem}.tmp.{ext}"
                fig.savefig(tmp, format=ext, bbox_inches=bbox, **options)
                tmp.replace(run.plots / f"{stem}.{ext}")
    finally:
        plt.close(fig)
    return f"plots/{stem}.png"


def with_declarations(study, record: dict) -> dict:
    """A run's record with the study's current primary metric and tables, and its comparisons, roles, claims and
    parameter matching where the record predates them, so `lmlab report` on an older run draws today's conclusions
    from its cells; a recorded comparison or claim the study still declares is taken as declared today (its
    controls, bounds and scale)."""
    from lmlab.config import build

    cfg = build(study.config_cls, record["config"], where="study.yaml")
    # what the study decides on today (e.g. MU: test perplexity, where older runs recorded the optimistic val_ppl)
    current = {"primary_metric": study.primary_metric, "lower_is_better": study.lower_is_better,
               "table_metrics": study.table_metrics(cfg), "change_metrics": study.change_metrics(cfg),
               "setting": study.setting(cfg)}  # a description of the recorded config, in today's words
    # the record's own declarations win; what it predates (e.g. comparisons a study declares since) is filled in
    declared = registry.declarations(study, cfg, record["configurations"])
    merged = {**declared, **record, **current}
    if "comparisons" in record and "comparisons" in declared:  # a comparison is judged with today's controls
        today = {(c["candidate"], c["parent"]): c for c in declared["comparisons"]}
        merged["comparisons"] = [today.get((c["candidate"], c["parent"]), c) for c in record["comparisons"]]
    if "claims" in record:  # a claim is read by today's rules (its controls, bounds, scale): the study's own
        # declaration of it wins; a recorded claim the study no longer declares is kept as recorded
        today = {(c["id"], c["claim"]): c for c in declared.get("claims", [])}
        merged["claims"] = [today.get((c["id"], c["claim"]), c) for c in record["claims"]]
        recorded = {(c["id"], c["claim"]) for c in record["claims"]}
        merged["claims"] += [c for key, c in today.items() if key not in recorded]
    return merged


def write_reports(run: RunDir) -> dict:
    record = run.read_study()
    study = registry.get_study(record["study"])
    record = with_declarations(study, record)
    rows = run.read_results()
    # rows of cells the run does not have (an edited or merged results.jsonl): left out, and named
    strays = [r for r in rows if r["config"] not in record["configurations"] or r["seed"] not in record["seeds"]]
    rows = [r for r in rows if r not in strays]
    summary = build_summary(record, rows)
    extra = json_safe(study.extra_summary(summary, rows, run, record))
    claims = summary.get("claims", []) + extra.pop("claims", [])
    summary.update(extra)
    if claims:
        summary["claims"] = claims
    run.write_json("summary.json", summary)
    write_csv(run, rows)
    metrics = [m for m in record.get("table_metrics", [record["primary_metric"]])
               if any(m in e["metrics"] for e in summary["configs"].values())]
    write_tex(run, summary, metrics)
    smoke = record["preset"] == "smoke"
    lines = [f"# {record['study']} study ({record['preset']} preset)"
             + (": a pipeline check, not evidence" if smoke else ""), ""]
    if smoke:
        lines += ["**This `smoke` run checks that the pipeline works end to end; its numbers are not evidence for or "
                  "against anything** (seconds of training on a very small model).", ""]
    lines += [
        f"Seeds: {', '.join(str(s) for s in record['seeds'])}. Reference of the change table: "
        f"`{summary['reference']}`. Headline: `{summary['decision']['candidate']}` vs "
        f"`{summary['decision']['reference']}`. Cells finished: {RunDir.count_cells(rows, record)} of "
        f"{len(record['configurations']) * len(record['seeds'])}. Generated from `results.jsonl` "
        f"(regenerate with `lmlab report {run.root}`). How to read it: {guide_link(run)}.",
        "",
        *([run.duplicates_note(), ""] if run.duplicates else []),
        *([_strays_note(strays, record), ""] if strays else []),
        "## Decision",
        "",
        summary["decision"]["text"],
        "",
        *([said, ""] if (said := secondary_sentence(summary, rows, record.get("change_metrics", []))) else []),
        *setting_section(record.get("setting", [])),
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
        f"## Change vs `{summary['reference']}` (relative change in %, paired by seed)",
        "",
        "Each cell: candidate / reference - 1 in %, the geometric mean of the per-seed ratios with a 95% t-interval "
        "and a paired t-test, both on the log scale (so no interval falls below -100%); the linear per-seed change "
        "where a value is 0 or negative. A change that is the same on every seed is one shared measurement (no "
        "interval).",
        "",
        *change_table(summary, [m for m in record.get("change_metrics", [record["primary_metric"]])
                                if any(m in e["metrics"] for e in summary["configs"].values())]),
        "",
    ]
    lines += lm_eval_section(summary)
    curve = training_curves_plot(run, record["configurations"],
                                 {c for c, e in summary["configs"].items() if e.get("invalid")}, study.stage_notes())
    lines += study.report_sections(summary, rows, run, record)
    if summary["failed_cells"]:
        lines += ["## Failed cells", "", "| configuration | seed | error |", "|---|---|---|"]
        lines += [f"| {f['config']} | {f['seed']} | {(f['error'] or '').replace('|', '/')} |"
                  for f in summary["failed_cells"]]
        lines.append("")
    plots = sorted(p.name for p in run.plots.glob("*.png")) if run.plots.exists() else []
    if plots:
        lines += ["## Plots", "", "Each plot is also saved as a vector PDF beside it (`plots/<name>.pdf`), for papers; "
                  "each plot's legend or axis label says what its shaded bands and error bars show.", ""]
        lines += [f"![{p}](plots/{p})" for p in plots]
        lines.append("")
    if curve is None:
        lines += ["(No training curves: no cell has recorded training steps yet.)", ""]
    lines += ["## Files", "", "`summary.json` (machine-readable summary), `results.jsonl` (one line per cell), "
              "`results.csv`, `report.tex` (LaTeX table to `\\input`, needs booktabs), `report_standalone.tex` (the "
              "table as a complete document: `pdflatex report_standalone.tex`), `study.yaml` (resolved configuration "
              "and library versions), "
              "`cells/<config>/seed-<s>/` (per-cell training curves, samples and artifacts).", ""]
    if summary.get("claims"):
        lines += ["## Claims of the research notes vs this run", "",
                  "Each claim as the notes made it, what this run measured with its 95% interval (a relative change "
                  "of the metric in % over seeds, better / worse saying which way, or a paired difference over items "
                  "where the row says so) and a verdict: supported (the interval excludes 0 on the claimed side and "
                  "holds the claimed size or lies beyond it), partly supported (it excludes 0 on the claimed side but "
                  "falls short of the claimed size: the direction holds, the size does not), not supported (it "
                  "excludes 0 on the other side, or holds 0 but excludes the claimed size), or not testable at this "
                  "scale (it holds both 0 and the claimed size, or the setting cannot show an effect of that size: "
                  "the row says why). A reason can come first: not supported as the component's effect (the candidate "
                  "does not beat a control or a known alternative: the verdict gives its largest edge over it and "
                  "what the control gains over the parent without the component), not supported at this scale (the "
                  "effect is excluded in this setting - at its learning rate and budget - although a control leaves "
                  "open whether the gain is the component's, or the component moved far further at a larger learning "
                  "rate and still gained less), not testable here (the configurations did not run, or one shared "
                  "measurement)."
                  + (" A claim that a model helps is read at this run's training budget: supported at this budget "
                     "where it is significantly better, not supported at this budget where it is not (no significant "
                     "gain, the verdict saying how large a gain the interval still allows, or a significant loss)."
                     if any(" at this budget" in c.get("verdict", "") for c in summary["claims"]) else "")
                  + " The setting column gives the notes' setting, and where this run's scale differs from it, how "
                  "(this run's whole setting is under Setting); a verdict speaks of this run's setting.", "",
                  *claims_table(summary), ""]
    atomic_write_text(run.root / "report.md", "\n".join(lines))
    return summary


GUIDE = "docs/reading-a-report.md"  # in the repository: every section, label, interval and plot of a report


def guide_link(run: RunDir) -> str:
    """A link to GUIDE relative to the run directory where the repository that holds this package has it (a source
    checkout), else its name in the repository."""
    guide = Path(__file__).resolve().parents[3] / GUIDE
    if not guide.is_file():
        return f"`{GUIDE}` in the lmlab repository"
    return f"[{GUIDE}]({Path(os.path.relpath(guide, run.root.resolve())).as_posix()})"


def _strays_note(strays: list[dict], record: dict) -> str:
    """The report's line on `results.jsonl` rows for cells the run does not have."""
    return (f"**{len(strays)} row(s) in `results.jsonl` are for cells this run does not have and were left out** "
            f"({RunDir.cells_text(strays)}; the run's configurations: {', '.join(record['configurations'])}; seeds: "
            f"{', '.join(map(str, record['seeds']))}).")


def regenerate(directory: Path) -> Path:
    """The report files of a run, from its results - after recording the rows its jobs wrote since (`--executor`:
    jobs that finished after the submitting process stopped). A run whose results.jsonl is gone is refused: its
    report would say no cell finished, over the report of the cells that did."""
    from lmlab.errors import ConfigError
    from lmlab.studies.parallel import collect_cell_results

    run = RunDir(directory)
    record = run.read_study()  # a directory that is no run is refused before anything is written
    collect_cell_results(run)
    if not run.results_path.exists() and (run.root / "report.md").exists():
        raise ConfigError(f"{run.results_path} is missing: the report is built from it, and rewriting it now would "
                          "replace the report of the finished cells with an empty one; restore the file, or continue "
                          f"the run (`lmlab run {record['study']} --resume {run.root}`) to compute the cells again")
    write_reports(run)
    return run.root
