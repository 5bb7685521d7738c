"""Report figures and the LaTeX table are paper-ready: one style per configuration across a run's plots, seed
spread shown, integer step ticks, plain log ticks, accuracy on [0, 1], legends clear of the data, identical series
told apart, a vector PDF beside every PNG, and a table that pdflatex compiles.

The plots are drawn from a hand-made run directory (study.yaml, cells' metrics.jsonl, result rows), so each test
knows the values behind every line; figures are caught as `save_figure` closes them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgba

from lmlab.studies import hylorada_study, latentwire_study, mu_study, report
from lmlab.studies.report import (
    config_styles,
    line_plot,
    mean_over_seeds,
    save_figure,
    training_curves_plot,
    write_tex,
)
from lmlab.studies.rundir import RunDir

CONFIGS = ["base", "lora", "rslora", "twin", "buckets"]  # twin: exactly rslora's values everywhere
SEEDS = [1, 2]
LOSS_STEPS = [1, 2, 3]
EVAL_STEPS = [10, 20, 30]


def _value(config: str, seed: int) -> tuple[int, float]:
    """(index of the series, seed offset): twin takes rslora's index, so its values are identical."""
    index = CONFIGS.index("rslora" if config == "twin" else config)
    return index, 0.05 * SEEDS.index(seed)


def _cell_records(config: str, seed: int) -> list[dict]:
    i, off = _value(config, seed)
    records = [{"kind": "train", "step": s, "loss": 4.0 - 0.1 * s * (i + 1) + off} for s in LOSS_STEPS]
    records += [{"kind": "eval", "step": s, "val_ppl": 600 / s * (1 + 0.1 * i) + 10 * off,
                 "val_acc": min(1.0, 0.1 * i + 0.01 * s + off)} for s in EVAL_STEPS]
    return records


def _row(config: str, seed: int) -> dict:
    i, off = _value(config, seed)
    details = {"decile_ppl": [50 + 10 * d + 5 * i + 20 * off for d in range(10)],
               "retrieval_by_depth": [min(1.0, 0.08 * d + 0.02 * i + off) for d in range(10)]}
    if config == "buckets":
        details["boundaries"] = {"initial": [2, 4, 8, 16], "learned": [2.5 + off, 4.2, 7.5, 16.5],
                                 "num_buckets": 5}
    return {"config": config, "seed": seed, "status": "ok", "metrics": {"val_ppl": 30.0 - i + off},
            "params": {"trainable_params": 100 * i}, "details": details, "error": None}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDir:
    """A finished run's files: study.yaml, results.jsonl and each cell's metrics.jsonl ('base' trains nothing)."""
    rundir = RunDir(tmp_path_factory.mktemp("figures") / "run")
    rundir.root.mkdir()
    rundir.write_study({"study": "fake", "preset": "smoke", "seeds": SEEDS, "configurations": CONFIGS,
                        "reference": "lora", "candidate": "rslora", "primary_metric": "val_ppl", "config": {},
                        "comparisons": []})
    for config in CONFIGS[1:]:
        for seed in SEEDS:
            cell = rundir.cell_dir(config, seed)
            cell.mkdir(parents=True)
            (cell / "metrics.jsonl").write_text("".join(f"{json.dumps(r)}\n" for r in _cell_records(config, seed)))
    for config in CONFIGS:
        for seed in SEEDS:
            rundir.append_result(_row(config, seed))
    return rundir


def _catch_figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every figure closed from now on (save_figure closes each after saving it), in order."""
    caught = []
    close = plt.close

    def catching_close(fig=None):
        caught.append(fig)
        close(fig)

    monkeypatch.setattr(plt, "close", catching_close)
    return caught


@pytest.fixture
def figures(monkeypatch) -> list:
    return _catch_figures(monkeypatch)


def _renderer(fig):
    """A renderer of the figure as saved (a closed figure has lost its canvas: give it a new one)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _rows() -> list[dict]:
    return [_row(c, s) for c in CONFIGS for s in SEEDS]


def _compression_rows() -> list[dict]:
    """LatentWire cells of one mode at two K; zero_prefix and shuffled_source score exactly alike."""
    rows = []
    for k, compression in ((4, 50.0), (8, 25.0)):
        for seed in SEEDS:
            metrics = {"target_text/acc_flexible": 0.5}
            for system, acc in (("bridged", 0.3), ("token_budget", 0.2), ("zero_prefix", 0.1),
                                ("shuffled_source", 0.1)):
                metrics[f"{system}/compression"] = compression
                metrics[f"{system}/acc_flexible"] = acc
                metrics[f"{system}/kv_bytes_saved"] = 1000.0 * k + seed
            rows.append({"config": f"stable_k{k}", "seed": seed, "status": "ok", "metrics": metrics,
                         "details": {"arm": {"fixes": True, "swapped": False, "mode": "soft_only", "num_queries": k},
                                     "eval_items": 20}})
    return rows


@pytest.fixture(scope="module")
def plots(run: RunDir) -> dict:
    """{plot: figure} of every configuration plot of the three studies, drawn once from the same run."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        figures = _catch_figures(monkeypatch)
        return _draw_all(run, figures)


def _draw_all(run: RunDir, figures: list) -> dict:
    drawn = {}
    for name, draw in (
        ("training", lambda: training_curves_plot(run, CONFIGS)),
        ("validation", lambda: mu_study._validation_curves_plot(run, CONFIGS)),
        ("decile", lambda: hylorada_study._decile_plot(_rows(), CONFIGS, run)),
        ("retrieval", lambda: hylorada_study._retrieval_plot(_rows(), CONFIGS, run)),
        ("boundaries", lambda: hylorada_study._boundary_section(_rows(), run)),
        # LatentWire passes only the configurations that ran; colours still come from the run's full list
        ("bridged", lambda: latentwire_study._training_plot(["rslora", "twin", "buckets"], run)),
    ):
        draw()
        drawn[name] = figures[-1]
    return drawn


def _config_of(label: str) -> str | None:
    """The configuration a legend label names ('twin [same values as rslora]', 'learned, buckets seed 1')."""
    label = label.removeprefix("learned, ").split(" [")[0].split(" seed ")[0]
    return label if label in CONFIGS else None


def test_a_configuration_has_one_colour_in_every_plot_of_a_run(plots: dict):
    styles = config_styles(CONFIGS)
    colours = {c: to_rgba(s["color"]) for c, s in styles.items()}
    assert len(set(colours.values())) == len(CONFIGS)
    seen: dict[str, set] = {}
    for name, fig in plots.items():
        for line in fig.axes[0].get_lines():
            config = _config_of(line.get_label())
            if config is not None:
                seen.setdefault(config, set()).add(to_rgba(line.get_color()))
                assert to_rgba(line.get_color()) == colours[config], (name, config)
    assert set(seen) == set(CONFIGS) and all(len(c) == 1 for c in seen.values())


def test_means_over_seeds_are_drawn_with_the_band_between_the_lowest_and_highest_seed(run: RunDir, plots: dict):
    curves = mean_over_seeds(report.cell_curves(run, CONFIGS, "train", "loss"))
    lora = curves["lora"]
    assert lora.x == LOSS_STEPS and lora.seeds == 2
    assert lora.low == pytest.approx([3.8, 3.6, 3.4]) and lora.high == pytest.approx([3.85, 3.65, 3.45])
    assert lora.y == pytest.approx([(a + b) / 2 for a, b in zip(lora.low, lora.high, strict=True)])
    for name in ("training", "validation", "decile", "retrieval", "bridged"):
        ax = plots[name].axes[0]
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        colours = {to_rgba(c.get_facecolor()[0])[:3] for c in bands}
        # a series with the same values as an earlier one shares that one's band (stacked bands would darken)
        drawn = {_config_of(line.get_label()) for line in ax.get_lines()
                 if "[same values as" not in line.get_label()} - {None}  # a line plot draws a twin on its line
        assert colours == {to_rgba(config_styles(CONFIGS)[c]["color"])[:3] for c in drawn}, name
        assert "min-max over 2 seeds" in ax.get_legend().get_title().get_text(), name
    band = next(c for c in plots["training"].axes[0].collections
                if to_rgba(c.get_facecolor()[0])[:3] == to_rgba(config_styles(CONFIGS)["lora"]["color"])[:3])
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(3.4) and ys.max() == pytest.approx(3.85)


def _visible_ticks(ax, axis: str = "x") -> list[float]:
    low, high = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    ticks = ax.get_xticks() if axis == "x" else ax.get_yticks()
    return [t for t in ticks if low <= t <= high]


def test_step_axes_have_integer_ticks(plots: dict):
    for name in ("training", "validation", "bridged", "boundaries"):
        ticks = _visible_ticks(plots[name].axes[0])
        assert len(ticks) >= 2 and all(t == int(t) for t in ticks), (name, ticks)


def _tick_labels(fig, ax) -> list[str]:
    _renderer(fig)
    return [t.get_text() for t in ax.yaxis.get_ticklabels(which="both") if t.get_text()]


def test_log_axes_have_plain_tick_labels(run: RunDir, plots: dict, figures: list):
    for name in ("validation", "decile"):
        fig = plots[name]
        ax = fig.axes[0]
        assert ax.get_yscale() == "log"
        labels = _tick_labels(fig, ax)
        assert len(labels) >= 3, (name, labels)
        for text in labels:
            assert re.fullmatch(r"[0-9][0-9,]*(\.[0-9]+)?", text), (name, text)  # 20, 1,500 - never 2x10^1
    # A range of several decades: labels at 1-2-5 or powers of ten, still plain.
    wide = {"wide": report.Curve([1, 2, 3], [1.5, 300.0, 20000.0])}
    line_plot(run, "wide.png", wide, styles=config_styles(["wide"]), xlabel="x", ylabel="y", title="t", logy=True)
    labels = _tick_labels(figures[-1], figures[-1].axes[0])
    assert {"10", "100", "1,000", "10,000"} <= set(labels) and all("$" not in t for t in labels)


def test_accuracy_axes_span_exactly_zero_to_one(run: RunDir, plots: dict, figures: list):
    assert plots["retrieval"].axes[0].get_ylim() == (0, 1)
    assert plots["bridged"].axes[0].get_ylim() == (0, 1)
    assert latentwire_study._compression_plot(_compression_rows(), run)
    accuracy_ax = figures[-1].axes[0]
    assert accuracy_ax.get_ylim() == (0, 1)
    assert all(0 <= t <= 1 for t in _visible_ticks(accuracy_ax, "y"))


def test_legends_stay_clear_of_the_data_and_long_titles_wrap(run: RunDir, plots: dict, figures: list):
    title = "A deliberately long title that names every configuration and the preset and the seeds it used " * 2
    ylabel = "a long axis label that would otherwise run past the height of the axes, off the figure"
    line_plot(run, "long.png", {"lora": report.Curve([1, 2], [0.5, 0.6])}, styles=config_styles(CONFIGS),
              xlabel="step", ylabel=ylabel, title=title)
    fig = figures[-1]
    ax = fig.axes[0]
    renderer = _renderer(fig)
    assert "\n" in ax.get_title()
    assert ax.title.get_window_extent(renderer).width <= ax.get_window_extent(renderer).width
    assert ax.yaxis.label.get_window_extent(renderer).height <= ax.get_window_extent(renderer).height
    for name, fig in plots.items():
        renderer = _renderer(fig)
        legend = fig.axes[0].get_legend()
        assert not legend.get_window_extent(renderer).overlaps(fig.axes[0].get_window_extent(renderer)), name
    latentwire_study._compression_plot(_compression_rows(), run)
    fig = figures[-1]
    renderer = _renderer(fig)
    legend_box = fig.legends[0].get_window_extent(renderer)
    assert not any(legend_box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)


LINE_PLOTS = ("training", "validation", "retrieval", "bridged")  # drawn by report.line_plot


def _note(ax) -> str:
    return "\n".join(t.get_text() for t in ax.texts)


def test_identical_series_stay_distinguishable(run: RunDir, plots: dict, figures: list):
    """The decile plot draws a twin over its original in another marker and line style; the line plots draw it as the
    original's line and say so (a legend label pointing below, a note naming the twin)."""
    lines = {_config_of(line.get_label()): line for line in plots["decile"].axes[0].get_lines()}
    rslora, twin = lines["rslora"], lines["twin"]
    assert list(rslora.get_ydata()) == list(twin.get_ydata())
    assert rslora.get_marker() != twin.get_marker() and rslora.get_linestyle() != twin.get_linestyle()
    assert twin.get_fillstyle() == "none"  # hollow: a marker drawn over another of another shape leaves both seen
    assert twin.get_label() == "twin [same values as rslora]"
    for name in LINE_PLOTS:
        ax = plots[name].axes[0]
        labels = [line.get_label() for line in ax.get_lines()]
        assert "rslora [and 1 more, listed below]" in labels and not any(label.startswith("twin") for label in labels)
        assert "rslora, and on its line:\n  twin (the same values)" in _note(ax), name
    latentwire_study._compression_plot(_compression_rows(), run)
    labels = [t.get_text() for t in figures[-1].legends[0].get_texts()]
    assert "shuffled_source (soft_only) [same values as zero_prefix (soft_only)]" in labels


def test_series_within_a_line_width_are_drawn_as_one_line_with_a_band_over_all_their_seeds(run: RunDir,
                                                                                          figures: list):
    """y spans 0..10, so means within 10/60 of an earlier series' at every x share its line: `near` (0.1 away) joins
    `a`, and the band spans both one's seeds; `far` (0.5 away at one x) gets its own line and band."""
    a = report.Curve([1, 2, 3], [5.0, 6.0, 10.0], [4.5, 5.5, 9.5], [5.5, 6.5, 10.0], 2)
    near = report.Curve([1, 2, 3], [5.1, 6.0, 9.95], [4.0, 5.9, 9.9], [5.2, 7.0, 10.0], 2)
    far = report.Curve([1, 2, 3], [5.0, 6.5, 10.0], [4.9, 6.4, 9.9], [5.1, 6.6, 10.0], 2)
    low = report.Curve([1, 2, 3], [0.0, 1.0, 2.0])
    configs = ["a", "near", "far", "low"]
    line_plot(run, "close.png", {"a": a, "near": near, "far": far, "low": low}, styles=config_styles(configs),
              xlabel="x", ylabel="y", title="t")
    fig = figures[-1]
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["a [and 1 more, listed below]", "far", "low"]
    assert "a, and on its line:\n  near (within 0.1)" in _note(ax)
    bands = {to_rgba(c.get_facecolor()[0])[:3]: c for c in ax.collections if isinstance(c, PolyCollection)}
    assert len(bands) == 2  # a's (for near as well) and far's; low is one seed
    ys = bands[to_rgba(config_styles(configs)["a"]["color"])[:3]].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(4.0) and ys.max() == pytest.approx(10.0)  # near's lowest seed, a's highest
    renderer = _renderer(fig)
    note = ax.texts[0].get_window_extent(renderer)
    assert not note.overlaps(ax.get_legend().get_window_extent(renderer))
    assert not note.overlaps(ax.get_window_extent(renderer))
    # the grouping itself, against distances computed here: on a log axis the distance is a ratio
    assert report.close_groups({"a": a, "near": near, "far": far}, 0.1) == {"a": [("near", pytest.approx(0.1))],
                                                                             "far": []}
    ratio = report.Curve([1, 2], [100.0, 200.0])
    assert report.close_groups({"r": ratio, "s": report.Curve([1, 2], [101.0, 202.0])}, 0.005, log=True) == {
        "r": [("s", pytest.approx(0.0043214, rel=1e-4))]}


def test_a_staged_configuration_is_marked_where_its_last_stage_starts(tmp_path: Path, figures: list):
    """A cell trained in two stages: its first stage's curve (metrics-<stage>.jsonl, steps 1-4) comes first, the last
    stage's steps follow from 5, and a dotted line in its colour at step 4 says what the last stage trains."""
    rundir = RunDir(tmp_path / "run")
    for config, stages in (("plain", ["metrics.jsonl"]), ("staged", ["metrics-first.jsonl", "metrics.jsonl"])):
        for seed in SEEDS:
            cell = rundir.cell_dir(config, seed)
            cell.mkdir(parents=True)
            for k, stage in enumerate(stages):
                (cell / stage).write_text("".join(json.dumps({"kind": "train", "step": s, "loss": 3.0 - k - 0.1 * s})
                                                  + "\n" for s in (2, 4)))
    assert report.stage_starts(rundir, "staged") == [4] and report.stage_starts(rundir, "plain") == []
    training_curves_plot(rundir, ["plain", "staged"], stages={"staged": "the bias alone"})
    ax = figures[-1].axes[0]
    staged = next(line for line in ax.get_lines() if line.get_label() == "staged")
    assert list(staged.get_xdata()) == [2, 4, 6, 8]
    marker = next(line for line in ax.get_lines() if "from here" in line.get_label())
    assert marker.get_label() == "staged: from here, the bias alone"
    assert list(marker.get_xdata()) == [4, 4] and marker.get_linestyle() == ":"
    assert to_rgba(marker.get_color()) == to_rgba(config_styles(["plain", "staged"])["staged"]["color"])


def test_the_decile_plot_zooms_on_the_change_vs_the_reference_paired_by_seed(plots: dict):
    """Top: every configuration, log axis, a labelled tick at or below the lowest curve. Bottom: the change vs the
    reference (lora) in %, per seed then averaged; buckets (+27% at the first decile) is beyond the zoom's +-25% and
    named instead, and rslora and its twin are named as drawn on top of one another."""
    fig = plots["decile"]
    assert len(fig.axes) == 2
    top, bottom = fig.axes
    assert top.get_yscale() == "log" and bottom.get_yscale() == "linear"
    assert min(_visible_ticks(top, "y")) <= 50 <= min(min(line.get_ydata()) for line in top.get_lines())
    lines = {_config_of(line.get_label()): line for line in bottom.get_lines()}
    assert set(lines) == {"base", "lora", "rslora", "twin"}
    assert list(lines["lora"].get_ydata()) == [0.0] * 10
    # decile d: lora 55 + 10d + 20 off, rslora 60 + 10d + 20 off (seed offsets off = 0, 0.05)
    expected = [sum(100 * 5 / (55 + 10 * d + 20 * off) for off in (0, 0.05)) / 2 for d in range(10)]
    assert list(lines["rslora"].get_ydata()) == pytest.approx(expected)
    text = " ".join(t.get_text().replace("\n", " ") for t in bottom.texts)
    assert "Not in this panel (beyond ±25% of lora at some decile; see the top panel): buckets." in text
    assert "Drawn on top of one another: rslora, twin (each mean within " in text


def test_each_comparison_gets_its_own_panel_of_per_decile_change_vs_its_parent(run: RunDir, figures: list):
    """One panel per comparison whose two configurations have deciles, the candidate's change vs its parent in %
    paired by seed, on its own y axis: a component with no effect (twin, exactly rslora) is a flat line at 0 whose axis
    is not stretched by the others' (a shared axis would flatten small components); a parent without deciles leaves
    its comparison out."""
    comparisons = [{"component": "rsLoRA scaling", "candidate": "rslora", "parent": "lora"},
                   {"component": "a copy", "candidate": "twin", "parent": "rslora"},
                   {"component": "buckets", "candidate": "buckets", "parent": "lora"},
                   {"component": "nothing to pair", "candidate": "rslora", "parent": "absent"}]
    drawn = hylorada_study._component_decile_plot(_rows(), CONFIGS, comparisons, run)
    assert drawn == [("rsLoRA scaling", "rslora", "lora"), ("a copy", "twin", "rslora"), ("buckets", "buckets", "lora")]
    fig = figures[-1]
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 3
    assert [ax.get_title().replace("\n", " ") for ax in panels] == [
        "rsLoRA scaling: rslora vs lora", "a copy: twin vs rslora", "buckets: buckets vs lora"]

    def data_line(ax):  # the one line with ten points (the other is the zero line)
        return next(line for line in ax.get_lines() if len(line.get_xdata()) == 10)

    # decile d of seed offset off: lora 55 + 10d + 20 off, rslora 60 + ..., buckets 70 + ... (see _row)
    def expected(shift):
        return [sum(100 * shift / (55 + 10 * d + 20 * off) for off in (0, 0.05)) / 2 for d in range(10)]

    assert list(data_line(panels[0]).get_ydata()) == pytest.approx(expected(5))
    assert list(data_line(panels[1]).get_ydata()) == [0.0] * 10
    assert list(data_line(panels[2]).get_ydata()) == pytest.approx(expected(15))
    assert to_rgba(data_line(panels[2]).get_color()) == to_rgba(config_styles(CONFIGS)["buckets"]["color"])
    spans = [ax.get_ylim()[1] - ax.get_ylim()[0] for ax in panels]
    assert spans[1] < spans[0] < spans[2]  # each on its own axis
    # a copy differs by nothing: drawn at the metric's resolution, saying so, not blown up to fill its axis
    assert panels[1].get_ylim() == pytest.approx((-2e-4, 2e-4))
    assert "within ±0.0001% (float rounding) at every decile" in [t.get_text() for t in panels[1].texts]
    # laid out (constrained) before save_figure measured it: the PNG holds the whole laid-out figure, suptitle included
    import matplotlib.image

    png = matplotlib.image.imread(run.plots / "component_by_decile.png")
    box = fig.get_tightbbox(_renderer(fig)).padded(0.05)
    assert png.shape[1] == pytest.approx(box.width * 150, abs=3) and png.shape[0] == pytest.approx(box.height * 150,
                                                                                                    abs=3)
    assert (run.plots / "component_by_decile.png").is_file() and (run.plots / "component_by_decile.pdf").is_file()
    assert hylorada_study._component_decile_plot(_rows(), CONFIGS, comparisons[3:], run) == []


def test_every_plot_is_saved_as_png_and_vector_pdf(run: RunDir, plots: dict):
    assert plots  # drawn into run.plots
    pngs = sorted(p.stem for p in run.plots.glob("*.png"))
    assert {"training_curves", "validation_curves", "perplexity_by_decile", "retrieval_by_depth", "bucket_boundaries",
            "bridged_accuracy_over_training"} <= set(pngs)
    assert pngs == sorted(p.stem for p in run.plots.glob("*.pdf"))
    assert not [p for p in run.plots.iterdir() if ".tmp." in p.name]  # written atomically, nothing left over
    pdf = (run.plots / "training_curves.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and b"/Type3" not in pdf  # TrueType fonts, as paper templates ask
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    assert save_figure(fig, run, "again.png") == "plots/again.png"
    first = (run.plots / "again.pdf").read_bytes()
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    save_figure(fig, run, "again.png")
    assert (run.plots / "again.pdf").read_bytes() == first  # no creation date: a regenerated report is identical


NASTY = {"lora_r=8 (50% & #1)": "lora", "rslora+bias~^<x>{y}$\\z": "bias", "Δ±≤×é 😀": "unicode"}
DECISION = "`rslora+bias` ≥ `lora_r=8` by 5% × 2 — p ≤ 0.05 → “done”… 😀 ~ ^ _ & # $ {x} <y> \\"


def _summary() -> dict:
    configs = {}
    for i, name in enumerate(NASTY):
        configs[name] = {"trainable_params": 1000 * i, "metrics": {
            "val_ppl": {"mean": 30.0 + i, "std": 0.5}, "acc_%": {"mean": 0.5, "std": None}},
            "vs_reference": {} if i == 0 else {"val_ppl": {"delta_pct": -1.5, "ci95": [-2.0, -1.0]}}}
    return {"study": "fake_study", "preset": "smoke", "seeds": [1, 2], "reference": "lora_r=8 (50% & #1)",
            "primary_metric": "val_ppl", "configs": configs, "decision": {"text": DECISION}}


def _unescaped(tex: str) -> set[str]:
    """LaTeX specials left in the body once commands (\\name), escaped characters (\\_ \\% ...) and the table's
    column separators ( & ) are removed."""
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))
    return set(re.sub(r"\\[a-zA-Z]+|\\[_%&#${}\\]", "", body).replace(" & ", "")) & set("_%&#^~<>")


def _pdflatex(directory: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape", name],
                          cwd=directory, capture_output=True, text=True, timeout=120)


def test_latex_table_escapes_everything_and_compiles_on_its_own(tmp_path: Path):
    write_tex(RunDir(tmp_path), _summary(), ["val_ppl", "acc_%"])
    fragment = (tmp_path / "report.tex").read_text(encoding="utf-8")
    standalone = (tmp_path / "report_standalone.tex").read_text(encoding="utf-8")
    assert fragment.startswith(r"% requires \usepackage{booktabs}")
    assert standalone.startswith(r"\documentclass{article}")
    assert r"\usepackage{booktabs}" in standalone
    assert standalone.count(r"\begin{document}") == 1 and standalone.rstrip().endswith(r"\end{document}")
    for tex in (fragment, standalone):
        assert tex.isascii()  # pdflatex stops at a Unicode character it has no definition for
        assert _unescaped(tex) == set()
        assert r"lora\_r=8 (50\% \& \#1)" in tex and r"\texttt{rslora+bias}" in tex
        assert r"$\Delta$$\pm$$\leq$$\times$e [U+1F600]" in tex
    if shutil.which("pdflatex") is None:
        return  # the structure above is what compiling needs; where TeX is installed, prove it
    proc = _pdflatex(tmp_path, "report_standalone.tex")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (tmp_path / "report_standalone.pdf").read_bytes().startswith(b"%PDF")
    # The fragment in a paper's preamble that loads booktabs, as its first line says.
    (tmp_path / "paper.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                                        "\\input{report.tex}\n\\end{document}\n")
    proc = _pdflatex(tmp_path, "paper.tex")
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_the_report_points_to_the_pdfs_and_the_standalone_table(run: RunDir, monkeypatch):
    from lmlab.studies import registry, runner

    monkeypatch.setattr(registry, "get_study", lambda name: runner.Study())  # a study without sections of its own
    report.write_reports(run)
    text = (run.root / "report.md").read_text(encoding="utf-8")
    assert "`plots/<name>.pdf`" in text and "report_standalone.tex" in text
    assert (run.plots / "training_curves.pdf").is_file() and (run.root / "report_standalone.tex").is_file()


def _cielab(rgb: tuple[float, float, float]) -> tuple[float, float, float]:
    """sRGB (0-1) to CIELAB under D65, by the CIE formulas."""
    def linear(c):
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = map(linear, rgb)
    xyz = ((0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047, 0.2126 * r + 0.7152 * g + 0.0722 * b,
           (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883)
    f = [t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29 for t in xyz]
    return 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])


def _ciede2000(lab1: tuple[float, float, float], lab2: tuple[float, float, float]) -> float:
    """The CIEDE2000 colour difference (Sharma, Wu and Dalal 2005), kL = kC = kH = 1."""
    import math

    (l1, a1, b1), (l2, a2, b2) = lab1, lab2
    c_bar = (math.hypot(a1, b1) + math.hypot(a2, b2)) / 2
    g = 0.5 * (1 - math.sqrt(c_bar ** 7 / (c_bar ** 7 + 25 ** 7)))
    a1, a2 = (1 + g) * a1, (1 + g) * a2
    c1, c2 = math.hypot(a1, b1), math.hypot(a2, b2)
    h1, h2 = (math.degrees(math.atan2(b, a)) % 360 for a, b in ((a1, b1), (a2, b2)))
    dh = 0.0 if c1 * c2 == 0 else (h2 - h1 + 180) % 360 - 180
    dh_big = 2 * math.sqrt(c1 * c2) * math.sin(math.radians(dh / 2))
    l_bar, c_bar = (l1 + l2) / 2, (c1 + c2) / 2
    if c1 * c2 == 0:
        h_bar = h1 + h2
    elif abs(h1 - h2) <= 180:
        h_bar = (h1 + h2) / 2
    else:
        h_bar = (h1 + h2 + 360) / 2 if h1 + h2 < 360 else (h1 + h2 - 360) / 2
    t = (1 - 0.17 * math.cos(math.radians(h_bar - 30)) + 0.24 * math.cos(math.radians(2 * h_bar))
         + 0.32 * math.cos(math.radians(3 * h_bar + 6)) - 0.20 * math.cos(math.radians(4 * h_bar - 63)))
    s_l = 1 + 0.015 * (l_bar - 50) ** 2 / math.sqrt(20 + (l_bar - 50) ** 2)
    s_c, s_h = 1 + 0.045 * c_bar, 1 + 0.015 * c_bar * t
    r_t = (-math.sin(math.radians(60 * math.exp(-(((h_bar - 275) / 25) ** 2))))
           * 2 * math.sqrt(c_bar ** 7 / (c_bar ** 7 + 25 ** 7)))
    dl, dc, dh_s = (l2 - l1) / s_l, (c2 - c1) / s_c, dh_big / s_h
    return math.sqrt(dl ** 2 + dc ** 2 + dh_s ** 2 + r_t * dc * dh_s)


def test_configuration_colours_are_distinct_to_the_eye_and_never_grey():
    """Sixteen configurations in one plot: every two colours of the palette are at least 20 apart in CIEDE2000 (the
    eye's colour difference; the Trubetskoy palette it was tuned from had lime and green 15.6 apart), none is a grey
    (references are drawn in grey), none too light to see on white."""
    import colorsys
    import itertools

    from lmlab.studies.report import PALETTE

    # The formula against Sharma, Wu and Dalal's published test pairs (pairs 1, 7 and 17 of their table).
    assert _ciede2000((50, 2.6772, -79.7751), (50, 0, -82.7485)) == pytest.approx(2.0425, abs=1e-4)
    assert _ciede2000((50, 0, 0), (50, -1, 2)) == pytest.approx(2.3669, abs=1e-4)
    assert _ciede2000((50, 2.5, 0), (73, 25, -18)) == pytest.approx(27.1492, abs=1e-4)
    assert _ciede2000(_cielab(to_rgba("#3cb44b")[:3]), _cielab(to_rgba("#a4c639")[:3])) < 16  # the old lime / green

    rgb = [to_rgba(c)[:3] for c in PALETTE]
    assert len(set(rgb)) == len(PALETTE) >= 15
    for a, b in itertools.combinations(rgb, 2):
        assert _ciede2000(_cielab(a), _cielab(b)) >= 20, (a, b)
    assert all(colorsys.rgb_to_hls(*c)[2] > 0.3 for c in rgb)
    assert all(_cielab(c)[0] <= 80 for c in rgb)
