"""Training checkpoints: a run stopped at any step and resumed equals a run never stopped (weights, history, best
evaluation, hook state, RNG), stop requests checkpoint first, and unusable checkpoints are refused in one line."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from torch import nn

from lmlab.engine.hooks import Display, Hooks
from lmlab.engine.interrupt import STOP, TrainingInterrupted
from lmlab.engine.losses import LossOut
from lmlab.engine.state import complete_checkpoints
from lmlab.engine.train import TrainConfig, train


class Noisy(nn.Module):
    """A small regression model with dropout: its steps draw from torch's RNG."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, x):
        return self.body(x).squeeze(-1)


def data(n: int = 24) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(n, 4, generator=gen)
    return [{"x": xs[i], "y": xs[i].sum()} for i in range(n)]


class Kill(Exception):
    """Stands for SIGKILL: the process ends at once, nothing is saved."""


class ToyHooks(Hooks):
    """Squared error; evaluations on fixed data with a stateful counter; optionally dies or asks to stop."""

    select = "val_loss"

    def __init__(self, kill_at: int | None = None, stop_at: int | None = None, evals_noise: bool = True):
        self.kill_at, self.stop_at = kill_at, stop_at
        self.evaluations = 0  # hook state: must survive a resume
        self.noise = evals_noise

    def collate(self, examples):
        return torch.stack([e["x"] for e in examples]), torch.stack([e["y"] for e in examples])

    def loss(self, state, model, batch):
        x, y = batch
        per = (model(x) - y) ** 2
        return LossOut(per.sum(), len(per), {"sq": per.detach().sum()})

    def after_step(self, state):
        if state.step == self.kill_at:
            raise Kill
        if state.step == self.stop_at:
            STOP.request(signal.SIGTERM)

    def evaluate(self, state):
        self.evaluations += 1
        xs = torch.stack([e["x"] for e in data(8)])
        loss = float(((state.model(xs) - xs.sum(-1)) ** 2).mean())
        # a draw from the global RNG: an evaluation that samples must see the same generator state after a resume
        return {"val_loss": loss + (1e-3 * float(torch.rand(())) if self.noise else 0.0),
                "evaluations": self.evaluations}

    def state_dict(self):
        return {"evaluations": self.evaluations}

    def load_state_dict(self, values):
        self.evaluations = values["evaluations"]


CFG = TrainConfig(epochs=4, batch_size=4, grad_accum=2, lr=1e-2, eval_every=2, early_stopping_patience=3,
                  log_every=1, checkpoint_every=2, checkpoint_minutes=None)
QUIET = Display(progress=False, log=lambda line: None)


def run(tmp_path, name, hooks, cfg=CFG, lines=None):
    model = Noisy()
    display = Display(progress=False, log=(lines.append if lines is not None else lambda line: None))
    # on the CPU also where there is a GPU: the tests compare resumed runs bitwise, and the hooks' data is on the CPU
    result = train(model, data(), cfg, seed=3, hooks=hooks, checkpoint_dir=tmp_path / name / "state",
                   metrics_path=tmp_path / name / "metrics.jsonl", display=display, device="cpu")
    return model, result


def lines_without_speed(path):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def assert_same(tmp_path, a, b, model_a, model_b, result_a, result_b):
    for (name, p), (_, q) in zip(model_a.named_parameters(), model_b.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert lines_without_speed(tmp_path / a / "metrics.jsonl") == lines_without_speed(tmp_path / b / "metrics.jsonl")
    assert result_a.best == result_b.best and result_a.steps == result_b.steps
    assert result_a.final_loss == result_b.final_loss and result_a.stopped_early == result_b.stopped_early


@pytest.mark.parametrize("kill_at", [1, 3, 4, 7])
def test_a_run_killed_at_any_step_resumes_to_the_same_weights_history_and_best(tmp_path, kill_at):
    model_a, result_a = run(tmp_path, "a", ToyHooks())
    assert result_a.steps == 12 and result_a.resumed_from is None
    with pytest.raises(Kill):
        run(tmp_path, "b", ToyHooks(kill_at=kill_at))
    hooks = ToyHooks()
    model_b, result_b = run(tmp_path, "b", hooks)
    assert result_b.resumed_from == (((kill_at - 1) // 2) * 2 or None)  # the last checkpoint before the kill
    assert_same(tmp_path, "a", "b", model_a, model_b, result_a, result_b)
    assert hooks.evaluations == 6  # the hook's counter came back with the checkpoint


def test_a_stop_request_checkpoints_the_step_and_the_resumed_run_is_the_same(tmp_path):
    model_a, result_a = run(tmp_path, "a", ToyHooks())
    with pytest.raises(TrainingInterrupted) as info:
        run(tmp_path, "b", ToyHooks(stop_at=5))
    assert info.value.signum == signal.SIGTERM and not STOP.requested
    assert [p.name for p in complete_checkpoints(tmp_path / "b" / "state")] == ["step-00000005"]
    model_b, result_b = run(tmp_path, "b", ToyHooks())
    assert result_b.resumed_from == 5
    assert_same(tmp_path, "a", "b", model_a, model_b, result_a, result_b)


def test_a_finished_run_returns_from_its_final_checkpoint_without_training(tmp_path):
    model_a, result_a = run(tmp_path, "a", ToyHooks())
    model_b, result_b = run(tmp_path, "a", ToyHooks())  # e.g. killed after training, before its result was recorded
    assert result_b.resumed_from == 12 and result_b.history == result_a.history
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)  # the best weights restored, as at the end of the first call


def test_a_corrupt_checkpoint_is_refused_in_one_line_and_training_restarts_cleanly(tmp_path):
    model_a, result_a = run(tmp_path, "a", ToyHooks())
    with pytest.raises(Kill):
        run(tmp_path, "b", ToyHooks(kill_at=5))
    [checkpoint] = complete_checkpoints(tmp_path / "b" / "state")
    tensors = checkpoint / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:100])
    lines: list[str] = []
    model_b, result_b = run(tmp_path, "b", ToyHooks(), lines=lines)
    assert len(lines) == 1 and str(tensors) in lines[0] and "starts from the beginning" in lines[0]
    assert result_b.resumed_from is None
    assert_same(tmp_path, "a", "b", model_a, model_b, result_a, result_b)


def test_a_foreign_checkpoint_is_refused_naming_what_differs(tmp_path):
    with pytest.raises(Kill):
        run(tmp_path, "b", ToyHooks(kill_at=5))
    lines: list[str] = []
    other = CFG.model_copy(update={"lr": 5e-3})
    _, result = run(tmp_path, "b", ToyHooks(), cfg=other, lines=lines)
    assert result.resumed_from is None and len(lines) == 1
    assert "state.json belongs to another training run (it differs in train)" in lines[0]
    # how often it checkpoints or logs is not part of what a checkpoint must share
    with pytest.raises(Kill):
        run(tmp_path, "c", ToyHooks(kill_at=5))
    _, result = run(tmp_path, "c", ToyHooks(), cfg=CFG.model_copy(update={"checkpoint_every": 3, "log_every": 2}))
    assert result.resumed_from == 4


def test_an_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    from lmlab.engine import state as S

    calls = {"n": 0}
    real = S.save_file

    def dies_on_second(tensors, path, *args, **kwargs):
        calls["n"] += 1
        real(tensors, path, *args, **kwargs)
        if calls["n"] == 2:
            raise Kill  # the tensors are on disk, state.json is not, the directory has its temporary name

    monkeypatch.setattr(S, "save_file", dies_on_second)
    with pytest.raises(Kill):
        run(tmp_path, "b", ToyHooks())
    monkeypatch.setattr(S, "save_file", real)
    assert [p.name for p in complete_checkpoints(tmp_path / "b" / "state")] == ["step-00000002"]
    model_a, result_a = run(tmp_path, "a", ToyHooks())
    model_b, result_b = run(tmp_path, "b", ToyHooks())
    assert result_b.resumed_from == 2
    assert_same(tmp_path, "a", "b", model_a, model_b, result_a, result_b)
    assert not list((tmp_path / "b" / "state").glob(".step-*"))  # the leftover temporary directory is gone


def test_checkpoint_of_an_adapted_model_holds_only_the_adapter(tmp_path, tiny_llama_dir):
    from safetensors import safe_open

    from lmlab.engine.hooks import PaddedLM
    from lmlab.hylorada import HyLoRADAConfig, apply_hylorada
    from lmlab.models.hf import load_causal_lm

    model = apply_hylorada(load_causal_lm(str(tiny_llama_dir)), HyLoRADAConfig(r=4, alpha=8, position_bias=True),
                           max_positions=64)
    examples = [{"input_ids": list(range(3, 35))} for _ in range(4)]
    cfg = TrainConfig(max_steps=2, batch_size=2, warmup_steps=0, checkpoint_every=1, checkpoint_minutes=None)
    train(model, examples, cfg, seed=0, hooks=PaddedLM(), checkpoint_dir=tmp_path / "state", display=QUIET)
    [checkpoint] = complete_checkpoints(tmp_path / "state")
    with safe_open(str(checkpoint / "tensors.safetensors"), "pt") as f:
        saved = {k[len("model."):] for k in f.keys() if k.startswith("model.")}  # noqa: SIM118
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert saved == trainable and len(trainable) < len(list(model.parameters()))


def test_a_signal_that_arrives_inside_a_finalizer_is_delivered_again_not_dropped(monkeypatch):
    """A handler that raises inside an object's __del__ (a progress bar's) gets its exception printed as
    "Exception ignored ... Traceback" and dropped, and the run goes on: the study's handler sends the signal again
    a moment later instead, and raises then."""
    import sys

    from lmlab.engine import interrupt
    from lmlab.studies.cell import StudyInterrupted
    from lmlab.studies.runner import _Signals

    sent = []
    monkeypatch.setattr(interrupt.os, "kill", lambda pid, signum: sent.append((pid, signum)))
    handler = _Signals()
    seen = {}

    class Finalized:
        def __del__(self):
            frame = sys._getframe()
            seen["in_del"] = interrupt.in_finalizer(frame)
            handler.handle(signal.SIGTERM, frame)  # must not raise here

    Finalized()  # collected at once: __del__ runs
    assert seen["in_del"] and not interrupt.in_finalizer(sys._getframe())
    deadline = time.time() + 5
    while not sent and time.time() < deadline:
        time.sleep(0.01)
    assert sent == [(os.getpid(), signal.SIGTERM)]  # delivered again
    with pytest.raises(StudyInterrupted):  # ... and outside the finalizer it stops the study
        handler.handle(signal.SIGTERM, sys._getframe())
