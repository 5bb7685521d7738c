"""`lmlab run --log tensorboard,mlflow,wandb`: what each tracker holds, read back through its own files (TensorBoard
event files, the MLflow store, the W&B offline run's transaction log), compared with the run's metrics.jsonl and
results.jsonl; a resumed cell continues its tracker runs; a missing tracker package is one line."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ONE_THREAD, read_jsonl, require_extras, run_cli
from lmlab.errors import ConfigError
from lmlab.tracking import parse_trackers

pytestmark = pytest.mark.xdist_group("tracking")
KILLER = Path(__file__).with_name("kill_worker.py")
ARGS = ["--preset", "smoke", "--seeds", "1", "only=[rslora]", "--quiet", "--log", "tensorboard,mlflow", "--log",
        "wandb"]
ENV = {**ONE_THREAD, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def train_curve(run: Path, config: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run / "cells" / config / "seed-42" / "metrics.jsonl")
            if r["kind"] == "train"}


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (`run-<id>.wandb`), read independently of wandb's reader: a 7-byte
    header (':W&B', magic, version), then LevelDB-log blocks of 32 KiB holding records split into chunks
    (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last); each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if kind == 0 and length == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(run: Path, config: str) -> dict:
    """History, summary, config and identity of the W&B offline runs of one cell (all attempts)."""
    history, summary, params, ids, names, groups = {}, {}, {}, set(), set(), set()
    for path in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                if record.run.display_name != f"{config}/seed-42":
                    break
                ids.add(record.run.run_id)
                names.add(record.run.display_name)
                groups.add(record.run.run_group)
                for item in record.run.config.update:
                    params[item.key] = json.loads(item.value_json)
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                if "train/loss" in items:
                    history[int(items["_step"])] = items["train/loss"]
            elif kind == "summary":
                for item in record.summary.update:
                    summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return {"history": history, "summary": summary, "config": params, "ids": ids, "names": names, "groups": groups}


def mlflow_runs(run: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lmlab-hylorada")
    return client, {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def check_trackers(run: Path, wandb: bool = True) -> None:
    rows = {r["config"]: r for r in read_jsonl(run / "results.jsonl")}
    assert set(rows) == {"lora", "rslora"}
    client, runs = mlflow_runs(run)
    assert set(runs) == {"lora/seed-42", "rslora/seed-42"}  # one tracker run per cell
    for config, row in rows.items():
        curve = train_curve(run, config)
        assert len(curve) >= 3
        # TensorBoard
        scalars = tensorboard_scalars(run / "tensorboard" / config / "seed-42")
        assert dict(scalars["train/loss"]) == pytest.approx(curve, rel=1e-6)
        assert len(scalars["train/loss"]) == len(curve)  # each step once
        assert scalars["result/val_ppl"][-1][1] == pytest.approx(row["metrics"]["val_ppl"], rel=1e-6)
        # MLflow
        found = runs[f"{config}/seed-42"]
        assert found.info.status == "FINISHED"
        assert found.data.tags["lmlab.config"] == config and found.data.tags["lmlab.run_dir"] == str(run.resolve())
        assert found.data.params["train.lr"] == str(json.loads(json.dumps(
            __import__("yaml").safe_load((run / "study.yaml").read_text())["config"]["train"]["lr"])))
        history = client.get_metric_history(found.info.run_id, "train/loss")
        assert {m.step: m.value for m in history} == pytest.approx(curve, rel=1e-6) and len(history) == len(curve)
        assert found.data.metrics["result/val_ppl"] == pytest.approx(row["metrics"]["val_ppl"], rel=1e-6)
        if not wandb:
            continue
        # W&B (offline)
        wb = wandb_run(run, config)
        assert len(wb["ids"]) == 1 and wb["groups"] == {run.name}
        assert wb["history"] == pytest.approx(curve, rel=1e-6)
        assert wb["summary"]["result/val_ppl"] == pytest.approx(row["metrics"]["val_ppl"], rel=1e-6)
        assert wb["config"]["train"]["lr"] == found.data.params["train.lr"] or \
            str(wb["config"]["train"]["lr"]) == found.data.params["train.lr"]


def test_each_cell_is_one_run_in_every_tracker(tmp_path: Path):
    require_extras("tensorboard", "wandb", "mlflow")
    out = tmp_path / "tracked"
    proc = run_cli("run", "hylorada", *ARGS, "--out", str(out), env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "mlflow" not in proc.stderr.lower()  # the store's setup is quiet
    check_trackers(out)


def interrupted_then_resumed(out: Path, kill: str, trackers: str) -> None:
    args = ["run", "hylorada", *ARGS[:-4], "--log", trackers, "--out", str(out), "train.epochs=4",
            "train.checkpoint_every=2"]
    stopped = subprocess.run([sys.executable, str(KILLER), *args], capture_output=True, text=True, timeout=900,
                             env={**ENV, "LMLAB_TEST_KILL": kill})
    assert stopped.returncode in (-9, 128 + 15), stopped.stderr
    assert len(read_jsonl(out / "results.jsonl")) == 1  # stopped in the second cell
    resumed = run_cli("run", "hylorada", "--resume", str(out), "--quiet", "--log", trackers, env=ENV)
    assert resumed.returncode == 0, resumed.stderr


def test_a_cell_resumed_after_sigterm_continues_its_tracker_runs(tmp_path: Path):
    require_extras("tensorboard", "wandb", "mlflow")
    interrupted_then_resumed(tmp_path / "stopped", "step:19:TERM", "tensorboard,mlflow,wandb")
    check_trackers(tmp_path / "stopped")


def test_a_cell_resumed_after_sigkill_continues_its_tensorboard_and_mlflow_runs(tmp_path: Path):
    require_extras("tensorboard", "mlflow")
    """SIGKILL gives W&B no chance to write what it buffers (its offline run of the killed attempt can be empty);
    TensorBoard and MLflow hold every record sent before the kill, and the resumed cell sends only the rest."""
    interrupted_then_resumed(tmp_path / "killed", "step:19", "tensorboard,mlflow")
    check_trackers(tmp_path / "killed", wandb=False)


def test_unknown_or_missing_trackers_are_one_line(tmp_path: Path, monkeypatch):
    proc = run_cli("run", "hylorada", "--preset", "smoke", "--out", str(tmp_path / "x"), "--log", "neptune")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "tensorboard, wandb, mlflow" in proc.stderr and not (tmp_path / "x").exists()
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"pip install 'lmlab\[tracking\]'"):
        parse_trackers(["tensorboard,wandb"])
    assert parse_trackers(None) == () and parse_trackers(["mlflow", "MLflow"]) == ("mlflow",)
