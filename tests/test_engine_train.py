"""The one training loop: exact global-batch losses, accumulation, DDP, early stopping, groups, schedule, memory.

Tests that compare with a CPU reference train on the CPU (`device="cpu"`, `LMLAB_DEVICE=cpu` for the workers) on a
machine with a GPU too; tests of GPU behaviour run on the GPU where there is one."""

from __future__ import annotations

import copy
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import Callbacks
from lmlab.engine.optim import GroupRule, lr_factor, param_groups
from lmlab.engine.train import (
    LossOut,
    NonFiniteLoss,
    TrainConfig,
    autocast_dtype,
    causal_lm_loss,
    collate_lm,
    train,
)

WORKER = Path(__file__).with_name("ddp_worker.py")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


# ---------------------------------------------------------------------------------------------------
# A toy regression problem whose examples carry their index, so tests can see what the loop did


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 1)
        self.gate = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 4] -> [B]
        return self.head(self.norm(self.proj(x))).squeeze(-1) * self.gate


def toy_data(n: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(n, 4, generator=gen)
    ys = xs.sum(-1) + 0.1 * torch.randn(n, generator=gen)
    return [{"id": i, "x": xs[i], "y": ys[i]} for i in range(n)]


def toy_collate(examples: list[dict]) -> dict:
    return {"id": torch.tensor([e["id"] for e in examples]), "x": torch.stack([e["x"] for e in examples]),
            "y": torch.stack([e["y"] for e in examples])}


def per_example_loss(model: nn.Module, batch: dict) -> torch.Tensor:  # [B]
    return (model(batch["x"]) - batch["y"]) ** 2


class RecordingLoss:
    """A summed squared-error loss that records, per call, the example ids and their loss values."""

    def __init__(self):
        self.calls: list[tuple[list[int], list[float]]] = []

    def __call__(self, model: nn.Module, batch: dict) -> LossOut:
        per = per_example_loss(model, batch)
        self.calls.append((batch["id"].tolist(), per.detach().tolist()))
        return LossOut(per.sum(), len(per), {"sq": per.detach().sum()})


def constant_lr(**kwargs) -> TrainConfig:
    """No warmup, no decay, a log record per step: effects of single steps are easy to predict."""
    kwargs.setdefault("warmup_steps", 0)
    kwargs.setdefault("schedule", "constant")
    return TrainConfig(log_every=1, **kwargs)


def trainable_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------------
# Batching: every example once per epoch, exact global-batch means


def test_every_example_is_seen_once_per_epoch_with_no_dropped_remainder():
    n, epochs = 10, 2
    loss = RecordingLoss()
    result = train(Toy(), toy_data(n), constant_lr(epochs=epochs, batch_size=3, grad_accum=2, lr=1e-3), seed=1,
                   hooks=Callbacks(loss, toy_collate), progress=False)
    seen = [i for ids, _ in loss.calls for i in ids]
    assert sorted(seen) == sorted(list(range(n)) * epochs)
    assert sorted(seen[:n]) == list(range(n))  # the first epoch is a permutation
    assert result.examples == epochs * n
    assert result.steps == epochs * math.ceil(n / 6)


def test_logged_loss_is_the_exact_mean_over_the_global_batch():
    # 10 examples, micro-batches of 3, accumulation 2: steps see 3+3 and then 3+1 examples, so a mean of
    # micro-batch means would weight the last example three times too much.
    loss = RecordingLoss()
    result = train(Toy(), toy_data(10), constant_lr(epochs=1, batch_size=3, grad_accum=2, lr=1e-2), seed=2,
                   hooks=Callbacks(loss, toy_collate), progress=False)
    assert [len(ids) for ids, _ in loss.calls] == [3, 3, 3, 1]
    logged = [h for h in result.history if h["kind"] == "train"]
    for step, record in enumerate(logged):
        values = [v for _, vals in loss.calls[2 * step:2 * step + 2] for v in vals]
        assert record["loss"] == pytest.approx(sum(values) / len(values), rel=1e-6)
        assert record["sq"] == pytest.approx(sum(values) / len(values), rel=1e-6)  # logs divided by the same weight


def test_gradient_is_the_gradient_of_the_global_mean():
    data = toy_data(10)
    torch.manual_seed(3)  # the same weights whichever tests ran before in this process
    model = Toy()
    start = copy.deepcopy(model)
    loss = RecordingLoss()
    grads: dict[int, dict[str, torch.Tensor]] = {}

    def capture(step: int, m: nn.Module) -> None:
        grads[step] = {n: p.grad.detach().clone() for n, p in m.named_parameters()}

    train(model, data, constant_lr(epochs=1, batch_size=3, grad_accum=2, lr=1e-2, max_grad_norm=None), seed=3,
          hooks=Callbacks(loss, toy_collate, before_step=capture), progress=False, device="cpu")
    # Step 0 from the initial weights: the whole global batch (ids of its two micro-batches) at once.
    ids = loss.calls[0][0] + loss.calls[1][0]
    batch = toy_collate([data[i] for i in ids])
    per_example_loss(start, batch).mean().backward()
    for name, p in start.named_parameters():  # float32 sums in another order: 1e-5 of the gradient's scale
        assert torch.allclose(grads[0][name], p.grad, atol=1e-5 * float(p.grad.abs().max()), rtol=1e-5), name


def test_aux_loss_adds_its_gradient_with_unit_weight():
    grads = {}
    for use_aux in (False, True):
        captured = []

        def capture(step: int, m: nn.Module, captured=captured) -> None:
            captured.append(m.gate.grad.item())

        def aux(m: nn.Module) -> torch.Tensor:
            return 0.5 * m.gate ** 2 * 3.0  # d/d gate = 3 * gate, not divided by the number of examples

        torch.manual_seed(0)  # the same initial weights in both runs
        train(Toy(), toy_data(6), constant_lr(epochs=1, batch_size=3, grad_accum=2, lr=1e-2), seed=12,
              hooks=Callbacks(RecordingLoss(), toy_collate, aux=aux if use_aux else None, before_step=capture),
              progress=False)
        grads[use_aux] = captured[0]
    assert grads[True] - grads[False] == pytest.approx(3.0 * 0.5, rel=1e-5)  # gate starts at 0.5


# ---------------------------------------------------------------------------------------------------
# Accumulation and DDP through tests/ddp_worker.py


def run_worker_in_process(out: Path, batch: int, accum: int, monkeypatch) -> dict:
    monkeypatch.setenv("LMLAB_DEVICE", "cpu")  # float32 on the CPU, as the torchrun workers
    monkeypatch.setattr(sys, "argv", [str(WORKER), str(out), str(batch), str(accum)])
    runpy.run_path(str(WORKER), run_name="__main__")
    return json.loads(out.read_text())


def assert_same_run(a: dict, b: dict, tolerance: float = 1e-4) -> None:
    assert a["steps"] == b["steps"] == 12  # 2 epochs x ceil(21 / 4)
    assert a["examples"] == b["examples"] == 42  # 2 epochs x 21 examples: no dropped remainder
    assert len(a["losses"]) == len(b["losses"]) == 12
    for x, y in zip(a["losses"], b["losses"], strict=True):
        assert abs(x - y) <= tolerance, (a["losses"], b["losses"])
    assert a["checksum"] == pytest.approx(b["checksum"], rel=1e-5)


def test_grad_accumulation_equals_the_large_batch(tmp_path, monkeypatch):
    big = run_worker_in_process(tmp_path / "b4.json", 4, 1, monkeypatch)
    accumulated = run_worker_in_process(tmp_path / "b2a2.json", 2, 2, monkeypatch)
    assert_same_run(big, accumulated)
    assert big["losses"][-1] < big["losses"][0] - 0.1  # it does learn


@pytest.mark.xdist_group("ddp")
def test_one_and_two_processes_give_the_same_losses_at_the_same_settings(tmp_path, monkeypatch):
    # train.batch_size is the global batch: at batch_size=4 two processes take 2 examples each per step, the
    # same 4 examples one process takes
    single = run_worker_in_process(tmp_path / "one.json", 4, 1, monkeypatch)
    # gloo on the CPU, also on a machine with GPUs (two processes on one GPU is what NCCL refuses)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMLAB_DEVICE": "cpu"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
         str(tmp_path / "two.json"), "4", "1"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(single, json.loads((tmp_path / "two.json").read_text()), tolerance=1e-5)


@pytest.mark.parametrize(("batch_size", "grad_accum", "world"), [(4, 1, 2), (6, 2, 3), (2, 3, 2), (3, 1, 1)])
def test_the_processes_share_each_global_batch_and_take_the_single_process_examples(batch_size, grad_accum, world,
                                                                                     monkeypatch):
    import lmlab.engine.train as engine

    cfg = constant_lr(epochs=2, batch_size=batch_size, grad_accum=grad_accum)
    n = 23
    steps = engine.total_steps(n, cfg)
    assert steps == 2 * math.ceil(n / (batch_size * grad_accum))  # the number of processes does not matter
    plans = []
    for rank in range(world):
        monkeypatch.setattr(engine.D, "rank", lambda rank=rank: rank)
        plans.append(list(engine._step_plan(n, cfg, seed=5, world=world, steps=steps)))
    monkeypatch.setattr(engine.D, "rank", lambda: 0)
    single = list(engine._step_plan(n, cfg, seed=5, world=1, steps=steps))
    global_batch = batch_size * grad_accum
    for step in range(steps):
        expected = sorted(i for part in single[step][1] for i, ghost in part if not ghost)
        assert len(expected) == min(global_batch, n - step % (steps // 2) * global_batch)  # epochs=2
        taken = sorted(i for plan in plans for part in plan[step][1] for i, ghost in part if not ghost)
        assert taken == expected  # the same examples, each once
        assert len({len(plan[step][1]) for plan in plans}) == 1  # the same number of passes on every rank
        assert all(len(part) <= batch_size // world for plan in plans for part in plan[step][1])


def test_more_processes_than_gpus_is_one_config_error_and_the_cpu_runs_them_when_asked(monkeypatch, capsys):
    """NCCL refuses two processes on one GPU ("Duplicate GPU detected"): lmlab says so before anything starts."""
    from lmlab.cli import main
    from lmlab.engine import distributed as D
    from lmlab.errors import ConfigError

    monkeypatch.delenv("LMLAB_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    expected = (r"^2 processes need 2 GPUs \(one each\), but 1 is visible: use --nproc 1 \(or --nproc auto\), or "
                r"LMLAB_DEVICE=cpu to run 2 processes on the CPU \(gloo\)$")
    with pytest.raises(ConfigError, match=expected):
        D.resolve_nproc("2")
    assert D.resolve_nproc("1") == 1 and D.resolve_nproc("auto") == 1
    for key, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)  # torchrun started without lmlab's --nproc
    with pytest.raises(ConfigError, match=expected):
        D.init_from_env()
    assert not D.is_distributed()
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key)
    assert main(["run", "mu", "--preset", "smoke", "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmlab: error: 2 processes need 2 GPUs")
    monkeypatch.setenv("LMLAB_DEVICE", "cpu")  # asked for: the CPU, gloo
    assert D.resolve_nproc("2") == 2 and D.device() == torch.device("cpu") and not D.uses_gpu()
    monkeypatch.setenv("LMLAB_DEVICE", "tpu")
    with pytest.raises(ConfigError, match=r"^LMLAB_DEVICE='tpu' is not one of auto, cpu, cuda$"):
        D.device()


def test_a_global_batch_that_does_not_split_across_the_processes_is_one_config_error():
    from lmlab.engine import distributed as D
    from lmlab.engine.train import check_batch_split
    from lmlab.errors import ConfigError
    from lmlab.studies.hylorada_study import HyloradaStudyConfig

    assert D.split_batch(8, 2) == 4 and D.split_batch(5, 1) == 5
    with pytest.raises(ConfigError, match=r"^train.batch_size = 5 is the global batch, split evenly across the 2 "
                                          r"processes: use a multiple of 2 \(e.g. 4\)$"):
        D.split_batch(5, 2)
    config = HyloradaStudyConfig()
    check_batch_split(config, 2)
    with pytest.raises(ConfigError, match=r"^base.train.batch_size = 16 .* 3 processes"):  # the tiny base's
        check_batch_split(config, 3)
    given = config.model_copy(update={"model": "gpt2"})  # a given model: no base is pretrained, its batch is moot
    with pytest.raises(ConfigError, match=r"^train.batch_size = 8 .* 3 processes: use a multiple of 3 \(e.g. 6\)$"):
        check_batch_split(given, 3)
    check_batch_split(given.model_copy(update={"train": TrainConfig(batch_size=9)}), 3)


# ---------------------------------------------------------------------------------------------------
# Early stopping, best weights, non-finite losses


def test_early_stopping_restores_a_copy_of_the_best_weights():
    scores = [5.0, 4.0, 2.0, 3.0, 3.5, 1.0, 0.5]  # best at the 3rd evaluation, then two without improvement
    snapshots: list[dict[str, torch.Tensor]] = []

    def evaluate(model: nn.Module) -> dict:
        snapshots.append(trainable_copy(model))
        return {"val_loss": scores[len(snapshots) - 1]}

    model = Toy()
    cfg = constant_lr(epochs=4, batch_size=2, lr=5e-2, eval_every=1, early_stopping_patience=2)
    result = train(model, toy_data(8), cfg, seed=4, hooks=Callbacks(RecordingLoss(), toy_collate, evaluate),
                   progress=False)
    assert result.stopped_early and result.steps == 5 and len(snapshots) == 5
    assert result.best["step"] == 3 and result.best["val_loss"] == 2.0
    final = trainable_copy(model)
    for name, value in final.items():
        assert torch.equal(value, snapshots[2][name]), name
    assert any(not torch.equal(final[n], snapshots[-1][n]) for n in final)  # the last weights differ
    evals = [h for h in result.history if h["kind"] == "eval"]
    assert [h["val_loss"] for h in evals] == scores[:5] and [h["step"] for h in evals] == [1, 2, 3, 4, 5]


def test_restore_best_without_patience_and_higher_is_better():
    scores = [0.1, 0.7, 0.3, 0.2]
    snapshots: list[dict[str, torch.Tensor]] = []

    def evaluate(model: nn.Module) -> dict:
        snapshots.append(trainable_copy(model))
        return {"acc": scores[len(snapshots) - 1]}

    model = Toy()
    result = train(model, toy_data(8), constant_lr(epochs=4, batch_size=8, lr=5e-2), seed=5,
                   hooks=Callbacks(RecordingLoss(), toy_collate, evaluate, select="acc", higher_is_better=True,
                                   restore_best=True), progress=False)
    assert result.steps == 4 and not result.stopped_early and result.best["step"] == 2
    for name, value in trainable_copy(model).items():
        assert torch.equal(value, snapshots[1][name]), name


def test_non_finite_loss_raises_with_its_step_and_leaves_weights_finite():
    model = Toy()
    before_bad_step: dict[str, torch.Tensor] = {}
    calls = []

    def loss_fn(m: nn.Module, batch: dict) -> LossOut:
        calls.append(1)
        per = per_example_loss(m, batch)
        if len(calls) == 3:  # the third optimizer step (one micro-batch per step)
            before_bad_step.update(trainable_copy(m))
            per = per * float("nan")
        return LossOut(per.sum(), len(per))

    with pytest.raises(NonFiniteLoss) as info:
        train(model, toy_data(12), constant_lr(epochs=1, batch_size=2, lr=1e-2), seed=6,
              hooks=Callbacks(loss_fn, toy_collate), progress=False)
    assert info.value.step == 3 and math.isnan(info.value.value)
    assert "at optimizer step 3" in str(info.value)
    for name, value in trainable_copy(model).items():
        assert torch.equal(value, before_bad_step[name]), name


# ---------------------------------------------------------------------------------------------------
# Optimizer groups and the schedule


RULES = [GroupRule("gate", lr=5e-2), GroupRule(r"^head\.", lr_scale=10.0, weight_decay=0.0)]
EXPECTED_GROUPS = {  # name -> (lr, weight decay) for base lr 1e-3, weight decay 0.1
    "proj.weight": (1e-3, 0.1), "proj.bias": (1e-3, 0.0), "norm.weight": (1e-3, 0.0), "norm.bias": (1e-3, 0.0),
    "head.weight": (1e-2, 0.0), "head.bias": (1e-2, 0.0), "gate": (5e-2, 0.0),
}


def test_param_groups_apply_rules_and_skip_decay_on_biases_norms_and_scalars():
    model = Toy()
    model.proj.bias.requires_grad_(False)
    groups = param_groups(model, 1e-3, 0.1, RULES)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    expected = {k: v for k, v in EXPECTED_GROUPS.items() if k != "proj.bias"}  # frozen: in no group
    assert sorted(got) == sorted(expected)
    for name, (lr, decay) in expected.items():
        assert got[name] == (pytest.approx(lr), decay), name
    assert sum(len(g["params"]) for g in groups) == len(expected)


def test_training_uses_the_group_learning_rates_and_decoupled_weight_decay():
    model = Toy()
    start = trainable_copy(model)
    grads: dict[str, torch.Tensor] = {}

    def capture(step: int, m: nn.Module) -> None:
        grads.update({n: p.grad.detach().clone() for n, p in m.named_parameters()})

    cfg = constant_lr(epochs=1, batch_size=8, lr=1e-3, weight_decay=0.1, max_grad_norm=None)
    result = train(model, toy_data(8), cfg, seed=7,
                   hooks=Callbacks(RecordingLoss(), toy_collate, rules=RULES, before_step=capture), progress=False,
                   device="cpu")
    assert result.steps == 1
    for name, value in trainable_copy(model).items():
        lr, decay = EXPECTED_GROUPS[name]
        # AdamW's first step: decay the weights, then move by lr * g / (|g| + eps).
        g = grads[name]
        expected = start[name] * (1 - lr * decay) - lr * g / (g.abs() + 1e-8)
        assert torch.allclose(value, expected, atol=1e-7, rtol=1e-5), name


def closed_form_factor(step: int, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)
    shape = (1 + math.cos(math.pi * progress)) / 2 if kind == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


@pytest.mark.parametrize(("kind", "min_ratio"), [("cosine", 0.0), ("cosine", 0.1), ("linear", 0.0)])
def test_lr_factor_is_linear_warmup_then_decay(kind, min_ratio):
    factors = [lr_factor(s, 3, 11, kind, min_ratio) for s in range(11)]
    assert factors == pytest.approx([closed_form_factor(s, 3, 11, kind, min_ratio) for s in range(11)])
    assert factors[2] == 1.0 and factors[3] == 1.0 and max(factors) == 1.0
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))  # decays monotonically
    assert lr_factor(0, 0, 10, "constant") == lr_factor(9, 0, 10, "constant") == 1.0


def test_schedule_steps_once_per_optimizer_step_in_training(tmp_path):
    # 20 examples, micro-batches of 2, accumulation 2: 5 optimizer steps per epoch, 10 in all.
    cfg = TrainConfig(epochs=2, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=3, schedule="cosine",
                      min_lr_ratio=0.1, log_every=1)
    metrics = tmp_path / "cell" / "metrics.jsonl"
    result = train(Toy(), toy_data(20), cfg, seed=8, hooks=Callbacks(RecordingLoss(), toy_collate),
                   metrics_path=metrics, progress=False)
    lrs = [h["lr"] for h in result.history if h["kind"] == "train"]
    assert lrs == pytest.approx([1e-2 * closed_form_factor(s, 3, 10, "cosine", 0.1) for s in range(10)])
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == result.history


def test_precision_auto_on_a_gpu_without_bf16_is_fp16_and_gets_a_loss_scaler(monkeypatch):
    # which dtype each precision autocasts to (no CUDA call beyond is_bf16_supported, which is replaced here)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for supported, auto in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert autocast_dtype(cuda, "auto") == auto  # fp16: train() builds its GradScaler from this dtype
        assert autocast_dtype(cuda, "fp16") == torch.float16 and autocast_dtype(cuda, "bf16") == torch.bfloat16
        assert autocast_dtype(cuda, "fp32") is None
    assert autocast_dtype(cpu, "auto") is None and autocast_dtype(cpu, "fp16") is None
    assert autocast_dtype(cpu, "bf16") == torch.bfloat16


def test_warmup_ratio_sets_the_warmup_steps():
    cfg = TrainConfig(epochs=1, batch_size=1, lr=1.0, warmup_ratio=0.25, schedule="linear", log_every=1)
    result = train(Toy(), toy_data(8), cfg, seed=9, hooks=Callbacks(RecordingLoss(), toy_collate), progress=False)
    lrs = [h["lr"] for h in result.history if h["kind"] == "train"]
    assert lrs == pytest.approx([closed_form_factor(s, 2, 8, "linear", 0.0) for s in range(8)])


# ---------------------------------------------------------------------------------------------------
# Language-model loss, gradient checkpointing, memory


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0, pad_token_id=0,
    ))


def lm_examples(n: int) -> list[dict]:
    gen = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(3, 97, (int(torch.randint(4, 20, (1,), generator=gen)),),
                                        generator=gen).tolist()} for _ in range(n)]


def test_causal_lm_loss_is_the_summed_nll_without_padding():
    model = tiny_llama().eval().requires_grad_(False)
    examples = lm_examples(3)
    batch = collate_lm(examples, pad_token_id=0)
    assert "attention_mask" in batch and batch["labels"].shape == batch["input_ids"].shape
    out = causal_lm_loss(model, batch)
    expected, count = 0.0, 0
    for e in examples:
        ids = torch.tensor([e["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1]
        expected += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += len(e["input_ids"]) - 1
    assert int(out.weight) == count
    assert float(out.total) == pytest.approx(expected, rel=1e-5)


def test_causal_lm_loss_with_token_weights_is_the_weighted_sum_and_total_weight():
    model = tiny_llama().eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(5)
    examples = [{**e, "loss_weights": (torch.rand(len(e["input_ids"]), generator=gen) * 4).tolist()}
                for e in lm_examples(3)]
    out = causal_lm_loss(model, collate_lm(examples, pad_token_id=0))
    expected, weight = 0.0, 0.0
    for e in examples:  # independent: one example at a time, the weight of the predicted token
        ids = torch.tensor([e["input_ids"]])
        nll = F.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none")
        w = torch.tensor(e["loss_weights"][1:])
        expected += float((nll * w).sum())
        weight += float(w.sum())
    assert float(out.weight) == pytest.approx(weight, rel=1e-6)
    assert float(out.total) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_checkpointing_on_a_frozen_base_gives_the_same_loss_and_gradients(device):
    base = tiny_llama()
    for p in base.parameters():
        p.requires_grad_(False)
    # The only trainable weight sits in the first layer: its gradient must flow back through both
    # checkpointed layers, whose inputs (frozen embeddings) do not require grad.
    base.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    runs = {}
    for checkpointing in (False, True):
        model = copy.deepcopy(base)
        mlp = model.model.layers[1].mlp
        mlp_calls = []

        def counted_forward(*args, forward=mlp.forward, calls=mlp_calls):
            calls.append(1)  # module hooks do not fire on recomputation, so count the forward itself
            return forward(*args)

        mlp.forward = counted_forward
        grads = []

        def capture(step: int, m: nn.Module, grads=grads) -> None:
            grads.append(m.model.layers[0].self_attn.q_proj.weight.grad.detach().clone())

        cfg = constant_lr(epochs=1, batch_size=4, lr=1e-3, max_steps=1, gradient_checkpointing=checkpointing,
                          max_grad_norm=None, precision="fp32")
        result = train(model, lm_examples(4), cfg, seed=10, hooks=Callbacks(before_step=capture), progress=False,
                       device=device)
        runs[checkpointing] = (result.final_loss, grads[0].cpu(), len(mlp_calls))
        assert not model.model.layers[1].gradient_checkpointing  # switched off again after training
    loss, grad, calls = runs[False]
    loss_ckpt, grad_ckpt, calls_ckpt = runs[True]
    assert calls == 1 and calls_ckpt == 2  # checkpointing really recomputed the layer in the backward pass
    assert grad.abs().sum() > 0
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    # on CUDA the attention backward may sum in another order
    assert torch.allclose(grad_ckpt, grad, atol=1e-7, rtol=1e-5 if device == "cpu" else 1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_result_reports_peak_memory_and_token_counts(device):
    rss_mb = psutil.Process().memory_info().rss / 2**20
    examples = lm_examples(6)
    result = train(tiny_llama(), examples, constant_lr(epochs=1, batch_size=4, lr=1e-3), seed=11, progress=False,
                   device=device)
    if device == "cpu":  # the process's resident memory
        assert result.peak_mem_mb > 0 and result.peak_mem_mb >= 0.9 * rss_mb
    else:  # CUDA memory allocated during training: the model, its gradients and optimizer state at least
        weights_mb = sum(p.numel() * p.element_size() for p in tiny_llama().parameters()) / 2**20
        assert 2 * weights_mb <= result.peak_mem_mb <= torch.cuda.max_memory_allocated() / 2**20
    assert result.tokens == sum(len(e["input_ids"]) for e in examples)
    assert result.examples == 6 and result.steps == 2 and result.train_time_s > 0
    assert math.isfinite(result.final_loss)
