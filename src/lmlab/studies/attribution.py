"""Attribution and claims: what a study concludes, computed from its cells (docs/protocol.md section 5).

A study declares *comparisons*: a candidate, the configuration it adds one component to (its parent), and
*controls* that would explain a gain trivially (e.g. a learned constant vector in place of landmarks, or a LoRA
with as many trainable parameters). Each comparison is judged on the primary metric, paired by seed:

- `worse`: the candidate is significantly worse than its parent;
- `not-significant`: the 95% interval of its change vs the parent contains 0;
- `explained-by-control`: it beats its parent, but not a control, and the interval vs that control excludes a gain
  as large as the one over the parent (the candidate's edge over the control is smaller than its gain over the
  parent): the control accounts for the gain (the sentence gives the candidate's largest edge over it, or that it
  is significantly worse than the control, and the control's own change vs the parent), and the component is not
  credited;
- `control-unresolved`: it beats its parent, but the interval vs a control holds both 0 and the whole gain over the
  parent: the comparison is too noisy to tell whether the control would gain as much, so the component is not
  credited - and the control is not said to explain anything;
- `uncontrolled`: it beats its parent, but a control it needs was not run (or, for a comparison marked
  `unmatched` or a candidate the run finds not parameter-matched, `needs_parameter_match`, no control with about as
  many trainable parameters exists): not credited;
- `A` / `B` / `C` / `D`: it beats its parent and every control - credited, with the notes' size rule on the
  improvement over the parent (A >= 2%, B 1-2%, C 0.5-1%, D < 0.5%).

"Parameters per 1%" is the parameters the component adds over its parent divided by its own improvement, only for
a credited component. The research notes' claims are judged the same way (`judge_claim`). Everything here is a
pure function of plain dicts, so `lmlab report` rebuilds it exactly.
"""

from __future__ import annotations

import math

from lmlab import stats

SCENARIO_MEANING = {
    "A": "a strong improvement (>= 2%)",
    "B": "a moderate improvement (1-2%)",
    "C": "a minimal improvement (0.5-1%)",
    "D": "no meaningful improvement (< 0.5%)",
}

LEGEND = [
    "- `A` / `B` / `C` / `D`: the candidate beats the configuration it adds the component to (its parent) and every "
    "control, each with a 95% interval that excludes 0, so the component is credited; the letter is the research "
    "notes' size rule on the improvement over the parent: A >= 2%, B 1-2%, C 0.5-1%, D < 0.5% (no meaningful "
    "improvement).",
    "- `not-significant`: the 95% interval of the change vs the parent contains 0: the data cannot tell them apart.",
    "- `worse`: the candidate is significantly worse than its parent.",
    "- `explained-by-control`: the candidate beats its parent but not a control, and the interval vs that control "
    "excludes a gain as large as the one over the parent: a trivial alternative gains at least as much, so the "
    "component is not needed for a gain of this size; not credited. (The two gains may arise differently: where the "
    "ablation shows that the candidate's gain lies in the weights trained beside its components, the sentence says "
    "so.)",
    "- `control-unresolved`: the candidate beats its parent, but the interval vs a control holds both 0 and the whole "
    "gain over the parent: the comparison cannot tell whether the control would gain as much, so the component is not "
    "credited (nor is the control said to explain the gain).",
    "- `moves-the-metric`: a positive control (a part trained alone) beats its parent: the metric can move in this "
    "setting; it shows what the setting can detect, and is not credited as a component's gain.",
    "- `uncontrolled`: the candidate beats its parent but a control it needs was not run (for a configuration that is "
    "not parameter-matched: a control with as many trainable parameters); not credited.",
    "- Changes are relative changes of the metric itself (candidate / other - 1, in %), paired by seed: for a "
    "perplexity negative is better, for an accuracy positive is better; the words better / worse say which. They are "
    "ratios, so the mean, its 95% t-interval and the paired t-test p-value are computed on the log scale and reported "
    "back in % (an interval never reaches -100%). A change that is the same on every seed is one shared measurement "
    "and has no interval. `params added` is the candidate's trainable parameters minus its parent's; `params per 1%` "
    "divides them by the improvement over the parent, for credited components only.",
]


def per_seed_values(rows: list[dict]) -> dict[str, dict[str, dict[int, float]]]:
    """{config: {metric: {seed: value}}} over the finished (ok) cells."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        for metric, value in r.get("metrics", {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(r["config"], {}).setdefault(metric, {})[r["seed"]] = float(value)
    return out


def improvement(values: dict, candidate: str, parent: str, metric: str, lower_is_better: bool) -> dict | None:
    """The candidate's improvement over `parent` on `metric` in % (positive = better), paired by seed."""
    cand = values.get(candidate, {}).get(metric)
    ref = values.get(parent, {}).get(metric)
    if not cand or not ref:
        return None
    change = stats.paired_relative_change(cand, ref)
    if change is None:
        return None
    sign = -1.0 if lower_is_better else 1.0
    ci = change["ci95"]
    return {
        "improvement_pct": sign * change["delta_pct"],
        "ci95": sorted([sign * ci[0], sign * ci[1]]) if ci else None,
        "p_value": change["p_value"],
        "n": change["n"],
        "delta_pct": change["delta_pct"],
        "delta_ci95": ci,
        "constant": change.get("constant", False),
        # on how many seeds the candidate's metric is the higher / the lower (ties on neither)
        "higher_seeds": sum(v > 0 for v in change["per_seed"].values()),
        "lower_seeds": sum(v < 0 for v in change["per_seed"].values()),
    }


def no_effect_reason(values: dict, candidate: str, parent: str, metric: str) -> str:
    """Why `improvement` found nothing to compare: a reference of 0 (the relative change is undefined) or cells
    that are missing or failed."""
    cand = values.get(candidate, {}).get(metric)
    ref = values.get(parent, {}).get(metric)
    if cand and ref and stats.reference_is_zero(cand, ref):
        return (f"the relative change is undefined because `{parent}`'s {metric} is 0 on every seed "
                f"(`{candidate}`: {', '.join(f'{v:g}' for v in cand.values())})")
    return f"no paired {metric} values (missing or failed cells)"


# The smallest relative change (in %) a study's metric resolves: 1e-6 relative. The same cell computed on 1 and on 2
# CPU threads (float sums rounded in another order) gave val_ppl and lim_ppl up to 6e-8 apart, relative; two
# configurations that compute the same function along different float paths (learnable buckets at their fixed
# initial edges) differ by that much on every seed, consistently - a paired test then calls rounding significant.
# An interval that lies wholly within +-RESOLUTION_PCT is no evidence of an effect, whatever its p-value.
RESOLUTION_PCT = 1e-4


def below_resolution(effect: dict | None) -> bool:
    """Whether an effect's 95% interval lies wholly within +-RESOLUTION_PCT (module constant)."""
    ci = (effect or {}).get("ci95")
    return bool(ci) and max(abs(ci[0]), abs(ci[1])) < RESOLUTION_PCT


def significant_gain(effect: dict | None) -> bool:
    return bool(effect and effect["ci95"] and effect["ci95"][0] > 0) and not below_resolution(effect)


def significant_loss(effect: dict | None) -> bool:
    return bool(effect and effect["ci95"] and effect["ci95"][1] < 0) and not below_resolution(effect)


def decimals(effect: dict) -> int:
    """Decimals that show an interval's width (2 for intervals wider than 0.1 points, up to 6): an interval that
    excludes 0 never prints as [-0.00, +0.00]. `effect` is an improvement or a change-table entry (`delta_pct`)."""
    ci = effect.get("ci95")
    value = effect["improvement_pct"] if "improvement_pct" in effect else effect["delta_pct"]
    scales = [abs(ci[1] - ci[0])] if ci else [abs(value)]
    if ci and (ci[0] > 0 or ci[1] < 0):
        scales.append(min(abs(ci[0]), abs(ci[1])))  # the end nearest 0 shows a digit, so it never reads -0.00
    scales = [v for v in scales if v > 0 and math.isfinite(v)]
    if not scales:
        return 2
    digits = int(min(6, max(2, 1 - math.floor(math.log10(min(scales))))))
    # an interval that holds 0 with an end that would print as +0.0000 shows that end's first digit (up to 6), so it
    # does not read as touching 0
    ends = [abs(v) for v in (ci or []) if v != 0 and math.isfinite(v)]
    while ends and digits < 6 and min(ends) < 0.5 * 10 ** -digits:
        digits += 1
    return digits


def signed(value: float, digits: int) -> str:
    """`value` with its sign at `digits` decimals, '+0.0012'; a value that rounds to 0 there has no sign ('0.000000',
    not '+0.000000')."""
    text = f"{value:+.{digits}f}"
    return text[1:] if float(text) == 0 else text


def direction(effect: dict) -> str:
    """'better' / 'worse' where the 95% interval excludes 0; otherwise what the data allow: 'no significant
    difference', or with no interval (one seed, a shared measurement) the sign of the one value."""
    imp = effect["improvement_pct"]
    if effect.get("ci95"):
        if below_resolution(effect):
            return "below the metric's resolution"
        return "better" if significant_gain(effect) else "worse" if significant_loss(effect) else \
            "no significant difference"
    return "better" if imp > 0 else "worse" if imp < 0 else "no change"


def effect_text(effect: dict | None) -> str:
    """'-1.23% [-1.96, -0.50], better (p = 0.012, 3 seeds)': the metric's relative change and its interval (the
    same sign convention as the change table), or 'no paired values'."""
    if effect is None:
        return "no paired values"
    digits = decimals(effect)
    ci = effect["delta_ci95"]
    delta = f"{signed(effect['delta_pct'], digits)}%"
    if effect.get("constant"):
        return f"{delta}, {direction(effect)} (one shared measurement on {effect['n']} seeds, no interval)"
    if not ci:
        return f"{delta}, {direction(effect)} (no interval: one seed)"
    p = effect.get("p_value")
    p_text = f"p = {p:.2g}" if p is not None else "no p-value"
    return (f"{delta} [{signed(ci[0], digits)}, {signed(ci[1], digits)}], {direction(effect)} ({p_text}, "
            f"{effect['n']} seeds)")


def control_explains(vs: dict | None, gain: float) -> bool:
    """Whether an unbeaten control accounts for a candidate's `gain` over its parent (an improvement in %): the
    candidate's edge over the control is shown to be smaller than that gain - the upper end of its 95% interval (the
    value itself where there is no interval) lies below it. Where the interval reaches the gain, the comparison
    cannot tell whether the control would gain as much: it explains nothing (`control-unresolved`)."""
    if vs is None or vs.get("improvement_pct") is None:
        return False
    ci = vs.get("ci95")
    return (ci[1] if ci else vs["improvement_pct"]) < gain


def judge_comparison(spec: dict, values: dict, params: dict, roles: dict, metric: str,
                     lower_is_better: bool) -> dict:
    """One comparison's effect vs its parent and its controls, its label and its sentence (module docstring)."""
    candidate, parent = spec["candidate"], spec["parent"]
    effect = improvement(values, candidate, parent, metric, lower_is_better)
    gain = effect["improvement_pct"] if effect else 0.0
    controls = []
    for control in spec.get("controls", []):
        vs = improvement(values, candidate, control, metric, lower_is_better)
        beaten = significant_gain(vs)
        controls.append({"config": control, "ran": control in values, "beaten": beaten,
                         "explains": not beaten and control_explains(vs, gain),
                         "vs_parent": improvement(values, control, parent, metric, lower_is_better),
                         "what": spec.get("control_notes", {}).get(control) or roles.get(control, {}).get("note", ""),
                         **(vs or {"improvement_pct": None})})
    unbeaten = [c for c in controls if c["ran"] and not c["beaten"]]
    if effect is None:
        scenario = "not-significant"
    elif significant_loss(effect):
        scenario = "worse"
    elif not significant_gain(effect):
        scenario = "not-significant"
    elif spec.get("positive_control"):  # it shows what the metric can do here; nothing to credit
        scenario = "moves-the-metric"
    elif any(c["explains"] for c in unbeaten):
        scenario = "explained-by-control"
    elif unbeaten:
        scenario = "control-unresolved"
    elif any(not c["ran"] for c in controls) or spec.get("unmatched"):
        scenario = "uncontrolled"
    else:
        scenario = stats.scenario(effect["improvement_pct"], effect["ci95"])
    credited = scenario in SCENARIO_MEANING
    added = None
    if params.get(candidate) is not None and params.get(parent) is not None:
        added = params[candidate] - params[parent]
    per_pct = added / effect["improvement_pct"] if credited and added is not None else None
    out = {
        "component": spec.get("component", candidate), "candidate": candidate, "parent": parent,
        "headline": bool(spec.get("headline")), "metric": metric, "params_added": added,
        "scenario": scenario, "credited": credited, "params_per_pct": per_pct, "controls": controls,
        "improvement_pct": effect["improvement_pct"] if effect else None,
        "ci95": effect["ci95"] if effect else None, "p_value": effect["p_value"] if effect else None,
        "n": effect["n"] if effect else 0,
        "delta_pct": effect["delta_pct"] if effect else None, "delta_ci95": effect["delta_ci95"] if effect else None,
        "constant": effect["constant"] if effect else False, "unmatched": bool(spec.get("unmatched")),
        "positive_control": bool(spec.get("positive_control")),
    }
    if effect is None:
        out["missing"] = no_effect_reason(values, candidate, parent, metric)
    out["text"] = comparison_text(out, effect)
    # a component that acts only through parts an ablation removes (`through`): where they carry little, a null here
    # says little about the component - the sentence says how little the setting lets it show
    carried = carried_bound(values, [candidate, parent], metric, spec.get("through")) \
        if scenario == "not-significant" else None
    if carried is not None and effect is not None:
        out["through_bound"] = carried[0]
        out["text"] = (out["text"].removesuffix(".") + f"; {carried[1]}, so the component has little to act on in "
                       "this setting, and its null result says little about it.")
    residual = beside_gain(values, candidate, parent, metric, lower_is_better) \
        if effect is not None and significant_gain(effect) and not spec.get("positive_control") else None
    if residual is not None:
        out["gain_without_components"] = residual
        out["text"] += (f" Its gain on {metric} does not come from what its position components add at evaluation: "
                        "removing them "
                        f"(the ablation) changes {metric} by {effect_text(residual['components'])}, and without them "
                        f"`{candidate}` still beats `{parent}`: {effect_text(residual)} - the gain is in the weights "
                        "trained beside them (which training with them may have shaped).")
    return out


# What the cells record for a configuration's metric with its trained position components removed (the ablation)
WITHOUT_COMPONENTS = "{metric}_without_position"


def beside_gain(values: dict, candidate: str, parent: str, metric: str, lower_is_better: bool) -> dict | None:
    """Where the candidate's gain over `parent` survives removing its position components (the ablation: the cells
    record `WITHOUT_COMPONENTS` for the candidate, and the parent has no such components), that gain: the candidate
    without its components vs the parent, a significant improvement; else None. A gain that survives is not what the
    components add at evaluation but what the weights trained beside them learned."""
    without = WITHOUT_COMPONENTS.format(metric=metric)
    if not values.get(candidate, {}).get(without) or values.get(parent, {}).get(without):
        return None
    residual = improvement({candidate: {metric: values[candidate][without]}, parent: values.get(parent, {})},
                           candidate, parent, metric, lower_is_better)
    if not significant_gain(residual):
        return None
    # what the components add at evaluation (the candidate with vs without them): where that is itself a significant
    # gain, part of the gain does come from them, and the sentence would overstate
    added = improvement({candidate: values[candidate], "without": {metric: values[candidate][without]}},
                        candidate, "without", metric, lower_is_better)
    return None if added is None or significant_gain(added) else {**residual, "components": added}


# Below this many seeds one sign on all of them is common under no effect (3 seeds: 1 in 4) and the sign test cannot
# come near 0.05 (3: p >= 0.25, 4: 0.125); from 5 seeds on (p >= 0.0625) it is worth a clause
SAME_SIGN_MIN_SEEDS = 5


def same_sign_clause(effect: dict, candidate: str, metric: str) -> str:
    """Where a null interval sits beside a change of one sign on every seed, the clause that says so, with the sign
    test's p (which ignores the sizes); '' otherwise or below SAME_SIGN_MIN_SEEDS. A reader who sees 'higher on 5 of
    5 seeds' next to 'cannot tell the two apart' should find both in one sentence."""
    higher, lower, n = effect.get("higher_seeds"), effect.get("lower_seeds"), effect["n"]
    if higher is None or effect.get("constant") or n < SAME_SIGN_MIN_SEEDS or max(higher, lower) < n:
        # (one measurement shared by every seed is no count of seeds: no sign test over its copies)
        return ""
    side = "higher" if higher == n else "lower"
    p = stats.sign_test(higher, lower)
    if p >= 0.05:  # one sign on every seed is the sign test's most extreme outcome: it cannot reach 0.05 here
        return (f"; `{candidate}`'s {metric} is the {side} on every one of the {n} seeds, the most one-sided result "
                f"{n} seeds allow - a sign test, which ignores the sizes, cannot reach 0.05 with {n} seeds (p = "
                f"{p:.3g}); more seeds would tell whether the difference is real")
    return (f"; `{candidate}`'s {metric} is the {side} on every one of the {n} seeds - a sign test, which ignores "
            f"the sizes, gives p = {p:.3g}: significant by that test alone, though the paired interval, which weighs "
            "the sizes and is the analysis here, cannot tell them apart")


def plain_pct(value: float) -> str:
    """`value` (in %) with two significant digits and no exponent: 0.0015, 0.017, 1.5, 12."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    return f"{value:.{max(0, 1 - math.floor(math.log10(abs(value))))}f}"


def explained_reading(controls: list[dict], parent: str, metric: str) -> str:
    """What the unbeaten controls that explain a candidate's gain over `parent` show (each a control entry: the
    candidate's improvement vs it, its `config`, and `vs_parent`, the control's own change vs `parent`): the
    candidate is significantly worse than it, or its edge over it is at most the upper end of its 95% interval (the
    value itself, said to be one, without an interval) - and what the control itself does vs `parent`, with its own
    interval, so a reader weighs the two gains side by side rather than a share that would treat one as exact."""
    parts = []
    for k in controls:
        name = f"`{k['config']}`"
        if significant_loss(k):
            said = f"significantly worse than {name}"
        elif k.get("ci95"):
            said = f"its edge over {name} is at most {plain_pct(max(k['ci95'][1], 0.0))}% (95% CI)"
        else:
            said = f"its edge over {name} is {plain_pct(k['improvement_pct'])}% (one value, no interval)"
        own = k.get("vs_parent")
        if own is not None:
            said += f", and {name} itself changes {metric} by {effect_text(own)} vs `{parent}`"
        parts.append(said)
    return " - " + "; ".join(parts) if parts else ""


# A control whose interval vs the candidate is this many times as wide as the candidate's vs its parent is said to lack
# the power to resolve the gain (a rank-matched control cannot share the parent's initialisation: its seeds differ)
LOW_POWER_RATIO = 5


def comparison_text(c: dict, effect: dict | None) -> str:
    """The sentence a report prints for one comparison."""
    added = c["params_added"]
    added_text = f", {added:+,} parameters" if added is not None else ""
    head = f"{c['component']} (`{c['candidate']}` vs `{c['parent']}`{added_text})"
    if effect is None:
        return f"{head}: {c['missing']}, so no conclusion."
    imp = effect["improvement_pct"]
    ci = effect["delta_ci95"]
    digits = decimals(effect)
    if effect.get("constant"):
        ci_text = f"one shared measurement on {effect['n']} seeds, no interval"
    else:
        ci_text = f"95% CI [{signed(ci[0], digits)}%, {signed(ci[1], digits)}%]" if ci else "no interval (one seed)"
    p_text = f"p = {effect['p_value']:.2g}" if effect.get("p_value") is not None else "no p-value"
    said = (f"{head}: {c['metric']} {signed(effect['delta_pct'], digits)}% vs `{c['parent']}`, {direction(effect)} "
            f"({ci_text}, {p_text}, {effect['n']} paired seeds)")
    scenario = c["scenario"]
    if significant_gain(effect) and imp < 0.5 and scenario not in SCENARIO_MEANING and scenario != "moves-the-metric":
        said += " - by less than 0.5%, a negligible amount"  # (D says it; a positive control's move is its point)
    if scenario == "not-significant" and below_resolution(effect):
        return (f"{said}: not an effect - the whole interval lies within +-{RESOLUTION_PCT:g}% (1e-6 relative), the "
                "size of float rounding (the same cell computed on 1 and on 2 CPU threads differs by up to 6e-8): the "
                "two are the same to the metric's resolution.")
    if scenario == "not-significant":
        said += ": not significant - the interval contains 0, so the data cannot tell the two apart"
        bounds = effect.get("ci95")
        if bounds:  # what the interval still rules out, in the improvement's orientation
            said += (f"; it excludes a gain of more than {max(bounds[1], 0.0):.{digits}f}% and a loss of more than "
                     f"{max(-bounds[0], 0.0):.{digits}f}%")
        said += same_sign_clause(effect, c["candidate"], c["metric"])
        if c.get("positive_control"):
            said += (" - a positive control that does not move the metric: by itself it cannot tell a blind spot of "
                     "this setting from a part that does nothing here (the ablation section reads the part further: by "
                     "position where it can, and against a run that gave it more room where there is one)")
        return said + "."
    if scenario == "worse":
        size = " - by less than 0.5%, a negligible amount" if imp > -0.5 else ""
        return f"{said}: significantly worse than `{c['parent']}`{size}."
    if scenario in ("explained-by-control", "control-unresolved"):
        explains = scenario == "explained-by-control"
        failed = [k for k in c["controls"] if k["ran"] and not k["beaten"] and k["explains"] == explains]
        parts = [f"`{k['config']}`" + (f" ({k['what']})" if k["what"] else "") + ": "
                 + (effect_text(k) if k["improvement_pct"] is not None else "no paired values") for k in failed]
        if explains:
            return (f"{said}, but not better than its control " + "; ".join(parts)
                    + explained_reading(failed, c["parent"], c["metric"]) + ", so the component is not credited.")
        wide = [k for k in failed if k.get("ci95") and effect.get("ci95")]
        ratio = max(((k["ci95"][1] - k["ci95"][0]) / (effect["ci95"][1] - effect["ci95"][0]) for k in wide
                     if effect["ci95"][1] > effect["ci95"][0]), default=0.0)
        power = (f" (its interval is {ratio:.0f}x as wide as the one vs `{c['parent']}`: the control does not share "
                 "the candidate's other trained weights seed by seed, so pairing by seed cancels little of the noise "
                 f"between them, and at {effect['n']} seeds it cannot resolve a gain this small)"
                 ) if ratio >= LOW_POWER_RATIO else ""
        return (f"{said}, but not separated from its control " + "; ".join(parts) + " - that interval holds both 0 "
                f"and the whole gain over `{c['parent']}`{power}, so the data cannot tell whether the control would "
                "gain as much: the component is not credited, and the control is not shown to explain the gain "
                "either.")
    if scenario == "moves-the-metric":
        return (f"{said}: a positive control - the metric can move in this setting when this part trains; it is "
                "not credited as a component's gain (it has no control of its own, so how much of the move needs "
                "what the component adds, rather than any trainable vector, is not established).")
    if scenario == "uncontrolled":
        missing = ", ".join(f"`{k['config']}`" for k in c["controls"] if not k["ran"])
        if missing:
            return f"{said}, but its control {missing} was not run, so the component is not credited."
        more = f" ({added:+,})" if added is not None else ""
        return (f"{said}, but it trains more parameters than its parent{more} and no parameter-matched control "
                "was run, so more trainable parameters could explain the gain: the component is not credited.")
    beaten = "; ".join(f"`{k['config']}` {effect_text(k)}" for k in c["controls"])
    vs_controls = f" and better than every control ({beaten})" if beaten else " (no control applies)"
    return f"{said}{vs_controls}: credited - scenario {scenario}, {SCENARIO_MEANING[scenario]}."


def decision_record(comparison: dict | None, candidate: str, reference: str, metric: str,
                    not_run: list[str] = ()) -> dict:
    """summary["decision"]: the headline comparison (or a 'no decision' record naming what is missing)."""
    if comparison is not None and not comparison["n"]:  # it ran, but there is nothing to compare: say why
        return {"scenario": "not-significant", "candidate": comparison["candidate"],
                "reference": comparison["parent"], "metric": metric, "credited": False,
                "text": f"No decision: {comparison['text']}"}
    if comparison is None:
        why = (f"{' and '.join(f'`{c}`' for c in not_run)} {'was' if len(not_run) == 1 else 'were'} not run; "
               "add it to only=[...]" if not_run else "missing or failed cells")
        return {"scenario": "not-significant", "candidate": candidate, "reference": reference, "metric": metric,
                "credited": False, "text": f"No decision: '{candidate}' and '{reference}' have no paired '{metric}' "
                f"values: {why}."}
    return {"scenario": comparison["scenario"], "improvement_pct": comparison["improvement_pct"],
            "ci95": comparison["ci95"], "p_value": comparison["p_value"], "n": comparison["n"],
            "candidate": comparison["candidate"], "reference": comparison["parent"], "metric": metric,
            "component": comparison["component"], "credited": comparison["credited"], "text": comparison["text"]}


def needs_parameter_match(spec: dict, matched: dict, params: dict, ratio: float) -> dict:
    """`spec` marked `unmatched` where the run shows what its declaration did not: the candidate is not a
    parameter-matched peer (`parameter_match` is False), it trains more parameters than its parent (more than
    `ratio` times as many, or any more over a matched parent), and no control trains at least 1 / `ratio` of the
    candidate's parameters - so more trainable parameters could explain a gain and nothing rules that out
    (`uncontrolled`, never credited)."""
    candidate, parent = spec["candidate"], spec["parent"]
    mine = params.get(candidate)
    if spec.get("unmatched") or matched.get(candidate) is not False or not mine or mine <= (params.get(parent) or 0):
        return spec
    if matched.get(parent) is False and (params.get(parent) or 0) * ratio >= mine:
        return spec  # a peer of an unmatched parent that adds few parameters to it
    if any((params.get(c) or 0) * ratio >= mine for c in spec.get("controls", [])):
        return spec
    return {**spec, "unmatched": True}


def parameter_match(trainable: int | None, base_trained: int | None, reference: int | None,
                    ratio: float) -> tuple[bool | None, str]:
    """Whether a configuration is a parameter-matched peer of the reference: it trains only adapter parameters (no
    base weights) and at most `ratio` times the reference's trainable parameters."""
    if not trainable:
        return None, "trains nothing"
    if base_trained:
        return False, f"also trains {base_trained:,} base-model parameters (embeddings / norms)"
    if reference and trainable > ratio * reference:
        return False, f"trains {trainable / reference:.1f}x the reference's parameters"
    return True, ""


# ---------------------------------------------------------------------------------------------------
# Claims of the research notes


def interval_verdict(interval: list[float] | None, claimed: float | None, claimed_text: str = "") -> str:
    """A claim's verdict from the 95% interval of its effect (an improvement: positive = better; `claimed` in the same
    orientation, negative for a claimed loss): supported when it excludes 0 on the claimed side and holds the claimed
    size or lies beyond it; partly supported when it excludes 0 on the claimed side but falls short of the claimed
    size (the direction holds, the size does not); not supported when it excludes 0 on the other side, or holds 0 but
    excludes the claimed size; not testable at this scale when it holds both. A claim of direction only (`claimed`
    None) holding 0 is not supported: no significant effect. An interval within +-RESOLUTION_PCT counts as holding
    0."""
    lo, hi = interval if interval else (-math.inf, math.inf)
    if (lo > 0 or hi < 0) and max(abs(lo), abs(hi)) >= RESOLUTION_PCT:  # an interval below resolution holds no effect
        way = "better" if lo > 0 else "worse"
        if claimed is None:
            return f"{'supported' if lo > 0 else 'not supported'}: significantly {way}"
        if (lo > 0) != (claimed > 0):
            return f"not supported: significantly {way}, against the claim"
        near, far, size = min(abs(lo), abs(hi)), max(abs(lo), abs(hi)), abs(claimed)
        if size < near:
            return f"supported: significantly {way}, by more than {claimed_text}"
        if size <= far:
            return f"supported: significantly {way}, and the interval holds {claimed_text}"
        return (f"partly supported: significantly {way} as claimed, but the interval excludes {claimed_text}: the "
                f"effect is at most {far / size:.2g} times the claimed size")
    if claimed is None:
        return "not supported: no significant difference (the interval holds 0)"
    if lo <= claimed <= hi:
        return f"not testable at this scale: the interval holds both 0 and {claimed_text or 'the claimed size'}"
    return f"not supported: no significant effect, and the interval excludes {claimed_text}"


def ablation_bound(values: dict, configs: list[str], metric: str, without: str) -> float | None:
    """The most, in % of `metric`, that the parts an ablation removes carry in any of `configs`: per configuration
    the paired change of `metric` with them vs `without` them (each cell evaluated both ways), taking the end of its
    95% interval farthest from 0; None where a configuration has no ablation values."""
    bounds = []
    for config in configs:
        change = stats.paired_relative_change(values.get(config, {}).get(metric, {}),
                                              values.get(config, {}).get(without, {}))
        if change is None:
            return None
        ends = change["ci95"] or [change["delta_pct"]]
        bounds.append(max(abs(v) for v in ends))
    return max(bounds)


def carried_bound(values: dict, configs: list[str], metric: str, through: dict | None) -> tuple[float, str] | None:
    """How much of `metric` the parts `through` names ({without, what}: the ablation metric that removes them) carry in
    those of `configs` that have them (`ablation_bound`), and the words for it; None without such parts or values."""
    if not through or not through["without"].startswith(f"{metric}_"):
        return None
    carriers = list(dict.fromkeys(c for c in configs if values.get(c, {}).get(through["without"])))
    bound = ablation_bound(values, carriers, metric, through["without"]) if carriers else None
    if bound is None:
        return None
    where = " and ".join(f"`{c}`" for c in carriers) if len(carriers) <= 2 else ", ".join(f"`{c}`" for c in carriers)
    return bound, (f"{through['what']} carry at most {bound:.2g}% of {metric} in {where} (removing them changes it "
                   "by no more, 95% CI)")


def _largest(values: dict, config: str, metric: str) -> float | None:
    """The largest of `config`'s per-seed values of `metric`, None where it has none."""
    vals = [v for v in values.get(config, {}).get(metric, {}).values() if v is not None]
    return max(vals) if vals else None


def _typical(values: dict, config: str, reach: dict) -> float | None:
    """The component's largest reach at the average token in `config` (`reach['typical']`), None where the cells did
    not record one."""
    return _largest(values, config, reach["typical"]) if reach.get("typical") else None


def reach_text(values: dict, config: str, reach: dict, moved: float) -> str:
    """`moved` (the component's largest reach in `config`, in %; `reach['what']` says where: at its most rescaled
    position), then its reach at the average token where the cells recorded one: a maximum over positions may come
    from one rarely seen position."""
    typical = _typical(values, config, reach)
    return f"{moved:.3g}%" + (f" and the average token's by up to {typical:.3g}%" if typical is not None else "")


def faster_reach_text(values: dict, reach: dict, fast: str, moved: float, slow: str, slow_moved: float) -> str:
    """'{what} by up to X% [and by T% at the average token] (at most Y% [and U%] in `slow`)': how far the component
    trained at a larger learning rate (`fast`) next to the run's (`slow`)."""
    typical, slow_typical = _typical(values, fast, reach), _typical(values, slow, reach)
    both = typical is not None and slow_typical is not None
    return (f"{reach['what']} by up to {moved:.3g}%" + (f" and by up to {typical:.3g}% at the average token" if both
                                                        else "")
            + f" (at most {slow_moved:.3g}%" + (f" and {slow_typical:.3g}%" if both else "") + f" in `{slow}`)")


def reach_clause(values: dict, config: str, reach: dict) -> str:
    """How far `config`'s component trained, from two metrics in % (`reach` {moved, allowed, what}: e.g. the most the
    position bias rescales the adapters' update as trained, and where a gradient of one sign would have taken it at
    the run's learning rate); "" where the cells did not record them. Descriptive: the largest of many parameters
    over seeds says how far the component got, not why it stopped there."""
    moved, allowed = _largest(values, config, reach["moved"]), _largest(values, config, reach["allowed"])
    if moved is None or allowed is None:
        return ""
    typical = _typical(values, config, reach)
    at_token = f", and by at most {typical:.3g}% at the average token" if typical is not None else ""
    return (f"as trained in `{config}`, {reach['what']} by at most {moved:.3g}%{at_token} (a gradient of one sign "
            f"would take {'the former' if at_token else 'it'} to about {allowed:.3g}% at this learning rate)")


def faster_clause(values: dict, reach: dict, parent: str, metric: str, lower_is_better: bool) -> str:
    """What the same component did at a larger learning rate (`reach['faster']`, a configuration compared with
    `parent`): how far it moved, the change of `metric`, and what that change allows; "" where it did not run."""
    faster, fast, moved = _faster(values, reach, parent, metric, lower_is_better)
    if fast is None or moved is None:
        return ""
    return (f"at a larger learning rate (`{faster}`) {reach['what']} by up to "
            f"{reach_text(values, faster, reach, moved)} and {metric} changes by {effect_text(fast)}"
            + faster_reading(fast))


def _faster(values: dict, reach: dict, parent: str, metric: str,
            lower_is_better: bool) -> tuple[str | None, dict | None, float | None]:
    """The configuration that trains the component at a larger learning rate (`reach['faster']`), its improvement
    over `parent` and how far the component moved there (None where it did not run)."""
    config = reach.get("faster") if reach else None
    if not config:
        return None, None, None
    return (config, improvement(values, config, parent, metric, lower_is_better),
            _largest(values, config, reach["moved"]))


# How much farther a component must move at a larger learning rate for its null there to speak for its room to act
FASTER_ROOM = 5.0


def faster_room(values: dict, candidate: str, reach: dict, parent: str, metric: str,
                lower_is_better: bool) -> dict | None:
    """Where the component, trained at a larger learning rate (`reach['faster']`), moved at least FASTER_ROOM times
    as far as in `candidate` and its change vs `parent` has an interval: {moved, slow, effect, bound} with `bound` the
    upper end of its improvement's 95% interval (the most it gains); else None."""
    _, effect, moved = _faster(values, reach, parent, metric, lower_is_better)
    slow = _largest(values, candidate, reach["moved"]) if reach else None
    if effect is None or not effect.get("ci95") or moved is None or slow is None or moved < FASTER_ROOM * slow:
        return None
    return {"moved": moved, "slow": slow, "effect": effect, "bound": effect["ci95"][1]}


def faster_reading(effect: dict) -> str:
    """What a component's change at a larger learning rate allows (an improvement, positive = better): that the run's
    learning rate held it back, or a gain of at most so much; nothing without an interval."""
    ci = effect.get("ci95")
    if not ci:
        return ": no interval, so nothing follows about the learning rate"
    if significant_gain(effect):
        return ": the run's learning rate held the component back"
    if ci[1] > 0:
        return f": at that learning rate, a gain of at most {ci[1]:.2g}% (95% CI)"
    return ": at that learning rate, no gain (the 95% interval excludes one)"


def seed_spread(values: dict, configs: list[str], metric: str) -> float | None:
    """How much `metric` varies from seed to seed, in % of its mean: the smallest over `configs` of the standard
    deviation over seeds over the mean (None where no configuration has two seeds)."""
    spreads = []
    for config in dict.fromkeys(configs):
        vals = [v for v in values.get(config, {}).get(metric, {}).values() if v is not None and math.isfinite(v)]
        if len(vals) >= 2 and sum(vals) != 0:
            mean = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
            spreads.append(abs(sd / mean) * 100)
    return min(spreads) if spreads else None


def _unbeaten_controls(spec: dict, values: dict, comparisons: list[dict], metric: str, lower_is_better: bool,
                       effect: dict) -> tuple[list[tuple[str, str, dict]], list[tuple[str, str, dict]]]:
    """For a claimed gain the run reproduces (`effect`: the candidate's improvement over its parent): the controls of
    the study's own comparison of the same pair (judged again on the claim's metric), and the claim's `explanation`
    where it is an alternative with the same parent (e.g. LoRA at a larger learning rate), that the candidate does
    not beat - as (those that explain the gain, those that cannot be told from it: `control_explains`), each as
    (its name and what it is, the candidate's change vs it, that change)."""
    comp = next((c for c in comparisons if c["candidate"] == spec["candidate"] and c["parent"] == spec["parent"]),
                None)
    others = [(control["config"], "") for control in (comp or {}).get("controls", [])]
    explanation = spec.get("explanation")
    if explanation and explanation["parent"] == spec["parent"]:
        others = [(c, w) for c, w in others if c != explanation["candidate"]]
        others.append((explanation["candidate"], f", {explanation['what']}"))
    explains, unresolved = [], []
    for config, what in others:
        vs = improvement(values, spec["candidate"], config, metric, lower_is_better)
        if vs is not None and not significant_gain(vs):
            (explains if control_explains(vs, effect["improvement_pct"]) else unresolved).append(
                (f"`{config}`{what}", f"vs `{config}`, {metric} changes by {effect_text(vs)}",
                 {**vs, "config": config,
                  "vs_parent": improvement(values, config, spec["parent"], metric, lower_is_better)}))
    return explains, unresolved


def _not_the_component_s(verdict: str, spec: dict, explains: list[tuple[str, str, dict]],
                         unresolved: list[tuple[str, str, dict]], metric: str) -> str:
    """A reproduced claimed gain that a control or an alternative accounts for is not the component's: the verdict
    leads with that, and keeps what the interval alone reads. Where a control is merely not separated from the
    candidate (`unresolved`), the claim is not testable - unless the candidate's own interval already excludes the
    claimed size (partly supported): then it is not supported at this scale, whoever would take the credit."""
    candidate = f"`{spec['candidate']}`"
    if explains:
        names = " and ".join(name for name, *_ in explains)
        return (f"not supported as the component's effect: {candidate} does not beat {names}: "
                f"{'; '.join(text for _, text, _ in explains)}"
                + explained_reading([vs for *_, vs in explains], spec["parent"], metric)
                + f", so the study does not credit the gain to the component; the interval alone reads: {verdict}")
    many = "s" if len(unresolved) > 1 else ""
    controls = f"({'; '.join(text for _, text, _ in unresolved)}: the interval holds both 0 and the whole gain)"
    if verdict.startswith("partly supported"):
        # the candidate's own interval already excludes the claimed size: a control can only take credit for what
        # was measured, never bring the claimed size back
        return (f"not supported at this scale: the interval excludes the claimed size, and even the gain it measures "
                f"is not separated from {candidate}'s control{many} {controls}, so the study cannot credit it to the "
                f"component; the verdict holds for this learning rate and budget only; the interval alone reads: "
                f"{verdict}")
    return (f"not testable at this scale: {candidate} is not separated from its control{many} {controls}, so the "
            f"study cannot credit the gain to the component; the interval alone reads: {verdict}")


def explanation_reading(leak: dict, effect: dict, spec: dict, explanation: dict, bound: float | None = None) -> str:
    """What a claim's known explanation (`leak`: its improvement, e.g. pooling over future tokens, or a larger learning
    rate) accounts for: nothing where it gains nothing significant; else whether its gain reaches the claimed size
    and, for an alternative to the candidate (the same parent), the candidate's measured gain - each judged by the
    upper end of its 95% interval. Where the setting cannot show the claimed size at all - the parts the component
    acts through carry less (`bound`, from the claim's `through` ablation), or the candidate itself stays below it
    (also where the explanation gains nothing: its null is then no test of the claimed size) - whether the
    explanation accounts for the claimed size is not testable here, and the reading says so."""
    claimed = spec.get("claimed_pct")
    size = abs(claimed) if claimed is not None else None
    if bound is not None and size is not None and bound < size:
        blind = (f"as the parts it acts through carry at most {bound:.2g}% here, this setting cannot show whether it "
                 f"explains a gain of the claimed {size:.2f}%")
        return ("gives no significant gain here; " if not significant_gain(leak) else "gains significantly; ") + blind
    top = effect["ci95"][1] if effect is not None and effect.get("ci95") else None
    if not significant_gain(leak):
        if size is not None and top is not None and top < size:
            # the candidate stays far below the claimed size: a null of what acts through it is no test of that size
            return (f"gives no significant gain here; `{spec['candidate']}` itself gains at most {top:.2g}%, less "
                    f"than the claimed {size:.2f}%, so whether it explains a gain of the claimed size is not testable "
                    "at this scale")
        return "gives no significant gain here, so it does not explain the claim at this scale"
    reach = leak["ci95"][1]
    said = []
    if explanation["parent"] == spec["parent"] and effect is not None:
        enough = reach >= effect["improvement_pct"]
        said.append(f"gains {'as much as' if enough else 'less than'} `{spec['candidate']}` does here, so it accounts "
                    f"for {'the' if enough else 'part of the'} measured gain")
    if size is not None:
        if reach >= size:
            said.append("can account for a gain of the claimed size")
        elif top is not None and top < size:
            said.append(f"gains at most {reach:.2g}% and `{spec['candidate']}` itself at most {top:.2g}%, both less "
                        f"than the claimed {size:.2f}%: nothing here reaches the claimed size, so whether it accounts "
                        "for it is not testable at this scale")
        else:
            said.append(f"gains at most {reach:.2g}%, less than the claimed {size:.2f}%, so it cannot account for the "
                        "claimed size at this scale")
    return "; it ".join(said) or "gains significantly"


def judge_claim(spec: dict, values: dict, comparisons: list[dict], lower_is_better: bool) -> dict:
    """A claim (docs/studies.md, claims of the research notes) against this run: what was measured and a verdict.

    kind "effect" (default): the claimed improvement of `candidate` over `parent` on `metric` (`claimed_pct`,
    positive = better), judged by `interval_verdict`: supported, partly supported (the direction holds, the size
    does not), not supported, or not testable at this scale (the run cannot resolve an effect that large).
    kind "credit": the claim credits the gain to a component: supported only when that comparison is credited.
    kind "null": "within noise": supported when no listed pair differs significantly; with `within_pct` the claim
    also bounds the differences' size, judged on their 95% intervals ("partly supported" where every interval lies
    within the bound but a pair differs significantly); with `through` (below) the pairs' designs differ only in parts
    an ablation removes, and where those carry less than the bound in every design the claim holds by construction:
    not testable at this scale.
    `claimed_text` names the claimed size where the notes gave a range (default: "the claimed -2.00% val_ppl").
    An `explanation` {candidate, parent, what} is measured too (e.g. the leak of pooling over future tokens).
    `through` {without, what}: the component acts only through parts that an ablation metric (`without`, e.g.
    val_ppl_without_position) removes; where those parts carry less than the claimed size, the setting cannot show
    it: not testable at this scale.
    The component's own ablation in the candidate is not such a bound: it restates what the trained component learned.
    `positive_control` {candidate, parent, what}: the component alone where it should move the metric if anything
    does; where that does not move it significantly, a verdict that is not "supported" is not testable at this scale
    (the setting may be blind to the component) - unless, at a larger learning rate (`reach['faster']`), the component
    moved at least FASTER_ROOM times as far and still gains less than the claim: then not supported at this scale.
    Where the positive control moves the metric, the verdict says by how much.
    Controls come first: a reproduced claimed gain that a control of the same pair or an alternative with the same
    parent (`explanation`) matches is not the component's (`_not_the_component_s`).
    `reach` {moved, allowed, what, faster}: how far the component trained, next to where a gradient of one sign would
    have taken it (two metrics in %); a verdict that is not "supported" says so, and what the component changed at a
    larger learning rate where `faster` (the configuration that trains it so) ran - else that the verdict holds for
    this learning rate only.
    """
    row = {"id": spec["id"], "claim": spec["claim"], "setting": spec.get("setting", "")}
    kind = spec.get("kind", "effect")
    metric = spec.get("metric", "val_ppl")
    if kind == "credit":
        comp = next((c for c in comparisons if c["candidate"] == spec["candidate"] and c["parent"] == spec["parent"]),
                    None)
        if comp is None:
            return {**row, "measured": "not run", "verdict": "not testable here: the comparison was not run"}
        total = improvement(values, spec["candidate"], spec["total_parent"], metric, lower_is_better) \
            if spec.get("total_parent") else None
        measured = f"`{comp['candidate']}` vs `{comp['parent']}`: " + effect_text(comp if comp["n"] else None)
        if total is not None:
            measured = f"vs `{spec['total_parent']}` {effect_text(total)}; " + measured
        share = improvement(values, spec["parent"], spec["total_parent"], metric, lower_is_better) \
            if spec.get("total_parent") else None
        own_top = comp["ci95"][1] if comp["n"] and comp.get("ci95") else None
        whole = total["improvement_pct"] if total is not None and significant_gain(total) else None
        parent_s = (f"`{spec['parent']}` alone changes {metric} vs `{spec['total_parent']}` by {effect_text(share)}"
                    if share is not None else "")
        if comp["credited"]:
            return {**row, "measured": measured,
                    "verdict": "supported: the component is credited (beats its parent and its controls)"}
        if whole is not None and own_top is not None and own_top < 0.5 * whole:
            # most of the whole gain is not the component's, whatever its own comparison resolves
            verdict = (f"not supported: the component's own gain over `{spec['parent']}` is at most "
                       f"{max(own_top, 0.0) / whole:.2%} of the whole gain over `{spec['total_parent']}` (95% CI); "
                       f"{parent_s}; the component's own comparison with `{spec['parent']}` reads "
                       f"{comp['scenario']} (see the attribution)")
            return {**row, "measured": measured, "verdict": verdict}
        if comp["scenario"] in ("control-unresolved", "not-significant"):
            verdict = (f"not testable at this scale: the component is not credited ({comp['scenario']}: the data "
                       "cannot tell its gain from its parent's or its control's)")
        elif comp["scenario"] == "uncontrolled":
            verdict = "not testable here: the component is not credited (uncontrolled: a control it needs was not run)"
        else:
            verdict = f"not supported: the component is not credited ({comp['scenario']})"
        return {**row, "measured": measured, "verdict": verdict + (f"; {parent_s}" if parent_s else "")}
    if kind == "null":
        effects = [(a, b, improvement(values, a, b, metric, lower_is_better)) for a, b in spec["pairs"]]
        ran = [(a, b, e) for a, b, e in effects if e is not None]
        if not ran:
            return {**row, "measured": "not run", "verdict": "not testable here: the configurations were not run"}
        measured = "; ".join(f"`{a}` vs `{b}` {effect_text(e)}" for a, b, e in ran)
        differ = [(a, b) for a, b, e in ran if significant_gain(e) or significant_loss(e)]
        named = ", ".join(f"`{a}` vs `{b}`" for a, b in differ)
        within = spec.get("within_pct")  # the claim also bounds the differences' size ("within 0.1%")
        reach = max((max(abs(v) for v in (e["ci95"] or [e["improvement_pct"]])) for _, _, e in ran), default=0.0)
        # "within noise" as the notes meant it: smaller than the metric varies from one run (seed) to another;
        # pairing by seed can resolve differences far below that, which then differ consistently, not beyond noise
        spread = seed_spread(values, [c for a, b, _ in ran for c in (a, b)], metric)
        in_noise = differ and spread is not None and reach < spread
        noise = (f"within the noise between seeds (the 95% intervals stay below the {spread:.2g}% by which {metric} "
                 f"varies from seed to seed, sd); paired by seed, {named} differ consistently, by less than "
                 f"{spread:.2g}%") \
            if in_noise else ""
        if within is None:
            verdict = ("supported: no pair differs significantly" if not differ else
                       f"supported: every difference is {noise}" if in_noise
                       else f"not supported: {named} differ significantly")
        elif reach > within:
            verdict = (f"not supported: a difference may exceed {within:g}% (the 95% intervals reach {reach:.2g}%)"
                       + (f"; {named} differ significantly" if differ else ""))
        elif not differ:
            verdict = (f"supported: no pair differs significantly, and every difference is within {within:g}% (the "
                       f"95% intervals reach {reach:.2g}%)")
        elif in_noise:
            verdict = (f"supported: every difference is within {within:g}% (the 95% intervals reach {reach:.2g}%) and "
                       f"{noise}")
        else:
            verdict = (f"partly supported: every difference is within {within:g}% as claimed (the 95% intervals "
                       f"reach {reach:.2g}%), but not shown to be within noise: {named} differ significantly, and "
                       + (f"the 95% intervals reach beyond the {spread:.2g}% by which {metric} varies from seed to "
                          "seed (sd)" if spread is not None else
                          "with one seed there is no spread between seeds to compare them with"))
        carried = carried_bound(values, [c for a, b, _ in ran for c in (a, b)], metric, spec.get("through")) \
            if within is not None else None  # the designs differ only in parts an ablation removes
        if carried is not None and carried[0] < within:
            verdict = (f"not testable at this scale: {carried[1]}, so designs that differ only in them could hardly "
                       f"differ by {within:g}% here: the claim holds by construction; the intervals alone read: "
                       f"{verdict}")
        return {**row, "measured": measured, "verdict": verdict}
    effect = improvement(values, spec["candidate"], spec["parent"], metric, lower_is_better)
    if effect is None:
        if spec["candidate"] in values and spec["parent"] in values:  # both ran: say why nothing compares
            reason = no_effect_reason(values, spec["candidate"], spec["parent"], metric)
            return {**row, "measured": f"`{spec['candidate']}` vs `{spec['parent']}`: {reason}",
                    "verdict": "not testable here: no relative change"}
        return {**row, "measured": "not run", "verdict": "not testable here: the configurations were not run"}
    claimed = spec.get("claimed_pct")  # improvement orientation: positive = better; None: direction only
    claimed_text = "" if claimed is None else spec.get("claimed_text") or \
        (f"the claimed {abs(claimed):.2f}% {'improvement' if claimed > 0 else 'degradation'} "
         f"({-claimed if lower_is_better else claimed:+.2f}% {metric}, as the change reads)")
    measured = f"`{spec['candidate']}` vs `{spec['parent']}` on {metric}: {effect_text(effect)}"
    if effect.get("constant"):
        verdict = "not testable here: one shared measurement, no interval"
    else:
        verdict = interval_verdict(effect["ci95"], claimed, claimed_text)
    out = {**row, "measured": measured, "verdict": verdict}
    reproduced = significant_gain(effect) and (claimed is None or claimed > 0)  # a claimed gain, reproduced
    if reproduced and out["verdict"].startswith(("supported", "partly supported")):
        explains, unresolved = _unbeaten_controls(spec, values, comparisons, metric, lower_is_better, effect)
        if explains or unresolved:
            out["verdict"] = _not_the_component_s(out["verdict"], spec, explains, unresolved, metric)
    elif significant_gain(effect) and claimed is not None and claimed < 0:  # a claimed loss, and a gain instead
        comp = next((c for c in comparisons if c["candidate"] == spec["candidate"] and c["parent"] == spec["parent"]
                     and c["metric"] == metric), None)
        if comp is not None and not comp["credited"]:
            out["verdict"] += (f"; nor is the gain the component's: the study does not credit it ({comp['scenario']}, "
                               "see the attribution)")
        elif comp is None:  # the study compares the pair on another metric: its controls, judged on this one
            explains, unresolved = _unbeaten_controls(spec, values, comparisons, metric, lower_is_better, effect)
            if explains:
                out["verdict"] += (f"; nor is the gain the component's: on {metric} `{spec['candidate']}` does not "
                                   "beat " + " and ".join(name for name, *_ in explains) + ": "
                                   + "; ".join(text for _, text, _ in explains)
                                   + explained_reading([vs for *_, vs in explains], spec["parent"], metric)
                                   + ", so the study does not credit that gain to the component")
            elif unresolved:
                out["verdict"] += (f"; nor is the gain shown to be the component's: on {metric} it is not separated "
                                   "from its control" + ("s" if len(unresolved) > 1 else "") + " ("
                                   + "; ".join(text for _, text, _ in unresolved)
                                   + ": the interval holds both 0 and the whole gain)")
    # the component acts only through other parts an ablation removed: how much they carry
    carried = carried_bound(values, [spec["candidate"], spec["parent"]], metric, spec.get("through")) \
        if claimed is not None else None
    bound = carried[0] if carried else None
    if carried is not None and abs(claimed) > bound:
        out["verdict"] = (f"not testable at this scale: {carried[1]}, less than the claimed {abs(claimed):.2f}%, so "
                          f"the setting cannot show an effect of the claimed size; the interval alone reads: "
                          f"{out['verdict']}")
    blind = spec.get("positive_control")  # the component alone, where it should move the metric if anything does
    alone = improvement(values, blind["candidate"], blind["parent"], metric, lower_is_better) if blind else None
    pc = f"its positive control, {blind['what']} (`{blind['candidate']}` vs `{blind['parent']}`)" if blind else ""
    reach = spec.get("reach")  # how far the component trained, and what it did at a larger learning rate
    faster = faster_room(values, spec["candidate"], reach, spec["parent"], metric, lower_is_better) if reach else None
    judged_fast = False
    if alone is not None and claimed is not None and not out["verdict"].startswith(("supported", "not testable")):
        still = alone.get("ci95") and not (significant_gain(alone) or significant_loss(alone))
        if still and faster is not None and claimed > 0 and faster["bound"] < claimed:
            # the control's null is at the run's learning rate; at a larger one the component moved far more and
            # still stays below the claim: it had room to act, so the claimed size is excluded, not out of reach
            judged_fast = True
            out["verdict"] = (f"not supported at this scale: at a larger learning rate (`{reach['faster']}`) "
                              + faster_reach_text(values, reach, reach["faster"], faster["moved"], spec["candidate"],
                                                  faster["slow"])
                              + f" and {metric} changes by {effect_text(faster['effect'])}: a gain of at most "
                              f"{faster['bound']:.2g}% (95% CI), less than the claimed {claimed:.2f}%; "
                              f"{pc}, does not move {metric} at the run's learning rate ({effect_text(alone)}); the "
                              f"interval alone reads: {out['verdict']}")
        elif still:
            out["verdict"] = (f"not testable at this scale: {pc}, does not move {metric} either "
                              f"({effect_text(alone)}), so the setting may be blind to the component; the interval "
                              f"alone reads: {out['verdict']}")
    if alone is not None and claimed is not None and significant_gain(alone):
        out["verdict"] += (f"; {pc}, moves {metric} by {effect_text(alone)}: the metric registers what the component "
                           "does trained alone, by that much")
    if reach and not judged_fast and not out["verdict"].startswith("supported"):
        clause = reach_clause(values, spec["candidate"], reach)
        fast_text = faster_clause(values, reach, spec["parent"], metric, lower_is_better)
        if clause:
            out["verdict"] += "; " + clause
        if fast_text:
            out["verdict"] += "; " + fast_text
        elif clause:
            out["verdict"] += ": the verdict holds for this learning rate and budget only"
    explanation = spec.get("explanation")
    if explanation:
        leak = improvement(values, explanation["candidate"], explanation["parent"], metric, lower_is_better)
        if leak is None:
            out["explanation"] = f"{explanation['what']}: not measured (`{explanation['candidate']}` not run)"
        else:
            reading = explanation_reading(leak, effect, spec, explanation, bound)
            out["explanation"] = (f"{explanation['what']}: `{explanation['candidate']}` vs `{explanation['parent']}` "
                                  f"{effect_text(leak)} - it {reading}")
    return out
