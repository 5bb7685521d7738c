"""`lmlab bench --gpu` (lmlab.benchsuite.gpu) where no GPU is needed: its options, the one-line refusal without CUDA,
the variants and steps it times (built on the CPU at a tiny size), and the comparison rows and table from a made-up
result. The measurements themselves need a CUDA GPU (scripts/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

from lmlab.benchsuite import gpu
from lmlab.cli import build_parser, main
from lmlab.errors import LmlabError


def test_lengths_and_models_are_checked_before_anything_runs():
    assert gpu.parse_lengths("32k,64k, 131072") == [32_768, 65_536, 131_072]
    assert gpu.parse_lengths(None) == list(gpu.DEFAULT_LENGTHS) and gpu.parse_lengths("none") == []
    with pytest.raises(LmlabError, match=r"^--lengths takes sequence lengths like .*; got 'long'$"):
        gpu.parse_lengths("32k,long")
    assert gpu.options(True, "4k", ["llama-1.1b"]) == {"quick": True, "models": ["llama-1.1b"], "lengths": [4096]}
    with pytest.raises(LmlabError, match=r"^unknown GPU benchmark model\(s\) gpt3; choose from gpt2-124m, llama-1.1b$"):
        gpu.options(False, None, ["gpt3"])
    args = build_parser().parse_args(["bench", "--gpu", "--quick", "--lengths", "8k", "--only", "gpt2-124m"])
    assert (args.gpu, args.quick, args.lengths, args.only) == (True, True, "8k", ["gpt2-124m"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_bench_gpu_without_cuda_is_one_line(capsys):
    assert main(["bench", "--gpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("lmlab: error: lmlab bench --gpu needs a CUDA GPU, and torch ") and "sees none" in err


TINY = {"gpt2": {"vocab_size": 128, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 2},
        "llama": {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_every_variant_trains_from_the_same_bf16_base_and_first_loss(arch):
    """The variants and steps the GPU benchmark times, on the CPU at a tiny size (bf16 autocast on the CPU)."""
    device = torch.device("cpu")
    spec = {"arch": arch, "config": TINY[arch], "batch": 2, "seq": 32}
    batch = gpu.token_batch(spec, 0, device)
    losses, trainable = {}, {}
    for variant in gpu.VARIANTS:
        model = gpu.make_variant(gpu.build_base(arch, TINY[arch], 0, device), arch, variant, spec["seq"])
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}  # the base stays bf16
        trainable[variant] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        step = gpu.make_step(model, batch, variant in gpu.LMLAB_ENGINE)
        losses[variant] = step()
        assert step() < float("inf")
    # adapters start as the identity (B = 0): every variant starts from the base's loss (bf16 logits: to 1%)
    assert max(losses.values()) - min(losses.values()) < 0.01 * min(losses.values())
    assert trainable["lmlab-lora"] == trainable["peft-lora"] and trainable["lmlab-dora"] == trainable["peft-dora"]
    assert trainable["hylorada"] > trainable["lmlab-lora"]  # + position bias and landmarks


def test_the_whole_gpu_benchmark_runs_through_on_the_cpu_at_a_tiny_size(tmp_path, monkeypatch):
    """`run` end to end - interleaved timing, memory per variant, the long-context probe, the files it writes - on
    the CPU at tiny sizes, CUDA's memory counters stood in for, so a GPU session does not find its bugs."""
    import json

    monkeypatch.setattr(gpu, "MODELS", {name: {**spec, "batch": 2, "seq": 32, "config": TINY[spec["arch"]]}
                                        for name, spec in gpu.MODELS.items()})
    monkeypatch.setattr(gpu, "LONG_MODEL", {**gpu.LONG_MODEL, "config": {**TINY["llama"], "rope_theta": 10000.0}})
    peaks = iter(range(1, 1000))
    for name, stand_in in (("synchronize", lambda *a: None), ("reset_peak_memory_stats", lambda *a: None),
                           ("empty_cache", lambda: None), ("max_memory_allocated", lambda *a: next(peaks) * 2**30)):
        monkeypatch.setattr(torch.cuda, name, stand_in)
    lines = []
    settings = gpu.GpuSettings(quick=True, lengths=[32, 64])
    path = gpu.run(settings, tmp_path, log=lines.append, device=torch.device("cpu"))
    results = json.loads(path.read_text())
    assert list(results["models"]) == list(gpu.MODELS) and not list(tmp_path.glob("*partial*"))
    for bench in results["models"].values():
        assert list(bench["variants"]) == list(gpu.VARIANTS)
        assert all(len(v["times_s"]) == 3 and v["peak_gib"] >= 1 for v in bench["variants"].values())
    assert [r["length"] for r in results["long_context"]["runs"]] == [32, 64]
    assert {(r["ours"], r["reference"]) for r in results["rows"]} >= {("lmlab-lora", "peft-lora"),
                                                                      ("hylorada", "lmlab-lora")}
    table = path.with_suffix(".md").read_text()
    assert "| 64 | " in table and "| gpu llama-1.1b | lmlab-lora | peft-lora |" in table
    assert any(line.startswith("  gpt2-124m: lmlab-lora vs peft-lora: ") for line in lines)  # as each model ends
    # one model's failure (memory, a library) is recorded and the other models and the probe still run
    real = gpu.bench_model

    def failing(name, *args):
        if name == "gpt2-124m":
            raise RuntimeError("CUDA error: out of memory")
        return real(name, *args)

    monkeypatch.setattr(gpu, "bench_model", failing)
    results = json.loads(gpu.run(settings, tmp_path, log=lines.append, device=torch.device("cpu")).read_text())
    assert results["models"]["gpt2-124m"]["error"] == "RuntimeError: CUDA error: out of memory"
    assert list(results["models"]["llama-1.1b"]["variants"]) == list(gpu.VARIANTS)
    assert {r["benchmark"] for r in results["rows"]} == {"gpu llama-1.1b"}
    assert [r["length"] for r in results["long_context"]["runs"]] == [32, 64]
    assert "FAILED: RuntimeError: CUDA error: out of memory" in gpu.markdown(results)
    assert not torch.backends.cuda.matmul.allow_tf32  # on the CPU, the bench leaves TF32 as it found it


def fake_results() -> dict:
    times = {"floor": 1.0, "floor-lmlab": 0.9, "peft-lora": 1.6, "peft-dora": 3.0, "lmlab-lora": 0.93,
             "lmlab-dora": 1.2, "hylorada": 0.97}
    memory = {"floor": 15.8, "floor-lmlab": 9.0, "peft-lora": 24.0, "peft-dora": 30.0, "lmlab-lora": 12.0,
              "lmlab-dora": 14.0, "hylorada": 12.5}
    models = {}
    for k, name in enumerate(gpu.MODELS):
        variants = {v: {"median_s": times[v] / (k + 1), "first_loss": 10.4, "trainable_params": 1000 + i,
                        "times_s": [times[v] / (k + 1) * (1 + 0.01 * r) for r in range(7)], "peak_gib": memory[v]}
                    for i, v in enumerate(gpu.VARIANTS)}
        variants["peft-dora"]["peak_gib"] = None  # ran out of memory
        models[name] = {"model": {"batch": 4, "seq": 2048}, "variants": variants}
    results = {"started": "2026-12-06T10:00:00", "machine": {"gpu": "NVIDIA H200", "gpus": 1, "gpu_memory_gib": 139.8,
                                                            "torch": "2.11", "cuda": "13.0", "transformers": "5.17",
                                                            "peft": "0.21"},
               "models": models, "long_context": {"model": {"name": "llama-3-8b", "vocab_size": 128256},
                                                  "runs": [{"length": 32768, "peak_gib": 40.0, "step_s": 9.5},
                                                           {"length": 131072, "peak_gib": None, "oom": True}]}}
    return results


def test_rows_and_table_from_a_result():
    results = fake_results()
    rows = gpu.rows_of(results)
    results["rows"] = [gpu.asdict(r) for r in rows]
    by = {(r.benchmark, r.ours, r.reference, r.metric): r for r in rows}
    lora = by[("gpu llama-1.1b", "lmlab-lora", "peft-lora", "s/step")]
    assert lora.ratio == pytest.approx(0.93 / 1.6) and lora.target == "<= 0.6" and lora.met
    assert lora.interval is not None  # 7 rounds: a 95% interval of the median ratio
    memory = by[("gpu llama-1.1b", "lmlab-lora", "peft-lora", "GiB")]
    assert memory.ratio == pytest.approx(0.5) and memory.met
    assert by[("gpu gpt2-124m", "lmlab-lora", "peft-lora", "s/step")].target is None  # the 0.6 targets: the 1.1B only
    assert by[("gpu gpt2-124m", "lmlab-dora", "peft-dora", "s/step")].met  # 1.2 / 3.0 = 0.4 <= 0.5
    assert ("gpu llama-1.1b", "lmlab-dora", "peft-dora", "GiB") not in by  # no memory ratio against an OOM
    table = gpu.markdown(results)
    assert "on 1 x NVIDIA H200 (140 GiB); torch 2.11 (CUDA 13.0), transformers 5.17, peft 0.21" in table
    assert "| gpu llama-1.1b | lmlab-lora | peft-lora | 12.0 GiB | 24.0 GiB | 0.500 |  | <= 0.6 | yes |" in table
    assert "| llama-1.1b | 4 x 2048 | peft-dora | 1,003 | 1500.0 | OOM |" in table
    assert "| 32,768 | 40.0 GiB | 9.5 |" in table and "| 131,072 | OOM |  |" in table


def test_out_of_memory_is_recognised_in_every_form_cuda_raises_it():
    from lmlab.errors import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("Expected all tensors to be on the same device"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only the errors allocators raise
