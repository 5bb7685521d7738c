"""Pretraining tiny base models for the embedded default, and caching them.

A pretrained tiny base is saved with `save_pretrained` (plus its tokenizer) in a cache directory keyed
by a hash of everything that determines it (architecture, data, tokenizer, training), so later runs
reuse it (docs/protocol.md section 2). It is the same base on every x86-64 machine with the same torch build: a
process of its own pretrains it in fp32 on the CPU with one torch thread (`PRETRAIN_DEVICE`, `PRETRAIN_THREADS`) and
with the CPU's vector instructions out of the sums (`PINNED_NUMERICS`: PyTorch's portable kernels, MKL's
cross-processor branch, none of lmlab's natively compiled C kernels). The rounding of a float sum depends on how many
threads share it and on the instructions that add it up, and over a few hundred steps that changes the base (at the
default preset's recipe, pretrained on 2 threads: val ppl 6.11; on 1 thread: 5.58 on one machine and 5.78 on an
AVX-512 one), and with it every conclusion drawn on top of it. Those settings take effect only before PyTorch first
computes, hence the process of its own.
Building one is safe under concurrency (a file lock) and under torchrun (rank 0 has it built while the others
wait, then every rank loads it). The models themselves (config and builder) are components in `lmlab.models.tiny`;
this is a recipe: it runs the training loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from filelock import FileLock
from pydantic import Field

from lmlab.config import Section
from lmlab.cpu_share import torch_threads
from lmlab.data import generators
from lmlab.data.batching import chunk_examples, recall_examples, tokenize_documents
from lmlab.data.tokenizer import train_bpe_tokenizer
from lmlab.engine import distributed as D
from lmlab.engine.hooks import Display, PaddedLM
from lmlab.engine.train import TrainConfig, train
from lmlab.eval.perplexity import evaluate_perplexity
from lmlab.fileio import cache_root
from lmlab.kernels.build import disabled as kernels_disabled
from lmlab.models.tiny import TinyModelConfig, build_tiny
from lmlab.studies.rundir import library_versions

PRETRAIN_FORMAT = 3  # bump when the pretraining recipe changes in a way the code hash below misses (3: PINNED_NUMERICS)
PRETRAIN_DEVICE, PRETRAIN_THREADS = "cpu", 1  # where every tiny base is pretrained (module doc)
# The pretraining process's environment, so its sums do not depend on the machine's CPU: PyTorch's kernels without
# AVX2/AVX-512 (its `default` capability; read once, before the first kernel runs) and MKL's conditional numerical
# reproducibility branch that gives the same results on every Intel and compatible processor (read when MKL starts),
# and none of lmlab's C kernels, which are compiled for the machine's own CPU (-march=native): attention is PyTorch's.
PINNED_NUMERICS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "LMLAB_CPU_KERNELS": "0",
                   "OMP_NUM_THREADS": str(PRETRAIN_THREADS), "MKL_NUM_THREADS": str(PRETRAIN_THREADS)}
# torchrun's variables stay out of it: the pretraining process is a world of its own
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                      "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                      "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")


def _recipe_fingerprint() -> str:
    """Hash of the code that produces a tiny base (data generators, tokenizer, example layout, model builder, this
    recipe), so a cached model is rebuilt when that code changes, not only when its config does."""
    from lmlab.data import batching
    from lmlab.data import tokenizer as tokenizer_module
    from lmlab.models import tiny as tiny_module

    digest = hashlib.sha256()
    for module in (generators, tokenizer_module, batching, tiny_module):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


class PretrainConfig(Section):
    """Everything that determines a cached tiny base model (its hash is the cache key)."""

    name: str = Field("base", description="a label for the cache directory")
    model: TinyModelConfig = TinyModelConfig()
    data: Literal["longdoc", "arithmetic", "corpus"] = "longdoc"
    num_docs: int = Field(2000, ge=10, description="training documents (arithmetic: problems)")
    num_facts: int = Field(2, ge=0, description="longdoc: facts per document")
    value_digits: int = Field(4, ge=1, description="longdoc: digits of a fact's value")
    recall_steps: int = Field(0, ge=0, description="longdoc: optimizer steps of a first phase whose loss covers only "
                              "the recalled values (teaches copying a planted value from far back)")
    recall_weight: float = Field(1.0, ge=1.0, description="longdoc: loss weight of the recalled values in the main "
                                 "phase (keeps the copying the first phase taught)")
    vocab_size: int = Field(1024, ge=259, description="BPE vocabulary (>= 256 bytes + 3 special tokens)")
    tokenizer_seed: int = 0
    data_seed: int = 0
    init_seed: int = 0
    train: TrainConfig = TrainConfig(epochs=1, batch_size=16, lr=2e-3, warmup_ratio=0.05, weight_decay=0.01)

    def key(self) -> str:
        payload = json.dumps({"format": PRETRAIN_FORMAT, "code": _recipe_fingerprint(), **self.model_dump()},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _training_documents(cfg: PretrainConfig, tokenizer=None) -> list:
    """The pretraining documents: texts, or `generators.LongDocument`s for longdoc data."""
    if cfg.data == "arithmetic":
        return [f"Question: {it['question']}\nAnswer: {it['answer']}"
                for it in generators.arithmetic_problems("train", cfg.num_docs, seed=cfg.data_seed)]
    if cfg.data == "corpus":
        return generators.corpus_documents(cfg.data_seed, cfg.num_docs)
    length_fn = partial(_token_count, tokenizer) if tokenizer else generators.word_count
    return generators.long_documents(cfg.data_seed, cfg.num_docs, target_length=cfg.model.context - 8,
                                     num_facts=cfg.num_facts, length_fn=length_fn, value_digits=cfg.value_digits)


def _recall_phase(cfg: PretrainConfig, model, tokenizer, display: Display):
    """The first pretraining phase: `recall_steps` steps on fresh long documents, loss on the recalled values only
    (`batching.recall_examples`)."""
    count = cfg.recall_steps * cfg.train.batch_size * cfg.train.grad_accum
    # a few more documents than steps need: a document whose query falls past the context has nothing to recall
    docs = generators.long_documents(cfg.data_seed + 1, count + count // 10 + 8, target_length=cfg.model.context - 8,
                                     num_facts=cfg.num_facts, length_fn=partial(_token_count, tokenizer),
                                     value_digits=cfg.value_digits)
    examples = recall_examples(docs, tokenizer, cfg.model.context, tokenizer.bos_token_id)[:count]
    return train(model, examples, cfg.train.model_copy(update={"epochs": 1, "max_steps": cfg.recall_steps}),
                 seed=cfg.init_seed, hooks=PaddedLM(tokenizer.pad_token_id), device=PRETRAIN_DEVICE,
                 display=display.named(f"pretrain {cfg.name}: recall"))


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def tokenizer_texts(data: str, n: int = 1500, seed: int = 0) -> list[str]:
    """Texts a tokenizer for `data` is trained on: the generator's own training distribution."""
    if data == "arithmetic":
        return [f"Question: {it['question']}\nAnswer: {it['answer']}"
                for it in generators.arithmetic_problems("train", n, seed=seed + 10_000)]
    rng = random.Random(f"tokenizer-{seed}")
    docs = [generators.long_document(rng, 200, num_facts=4).text for _ in range(n // 2)]
    return docs + generators.corpus_documents(seed + 10_000, n // 2, sentences_per_doc=20)


def pretrained_tiny(cfg: PretrainConfig, *, display: Display | None = None) -> Path:
    """Path of the cached pretrained model for `cfg`, pretraining it first when it is not cached (shown through
    `display`: by default a progress bar and messages on stderr)."""
    target = cache_root() / "models" / f"{cfg.name}-{cfg.model.arch}-{cfg.key()}"
    if (target / "lmlab_pretrain.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock") if D.is_main() else None
    if lock is not None:
        lock.acquire()
    try:
        ready = D.broadcast_object((target / "lmlab_pretrain.json").exists())
        if not ready and D.is_main():
            _pretrain_in_own_process(cfg, target, display or Display())
        D.barrier()
    finally:
        if lock is not None:
            lock.release()
    return target


def _pretrain_in_own_process(cfg: PretrainConfig, target: Path, display: Display) -> None:
    """Pretrain into `target` in a new Python process with `PINNED_NUMERICS` (module doc). Its messages come back
    through `display` (one per stdout line); its progress bar, where `display` shows one, goes to stderr. The process
    ends with this one: stopped here on any exception (an interrupt included), and on Linux sent SIGTERM by the
    kernel if this process dies first; it exits quietly on either signal."""
    import signal
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(PINNED_NUMERICS)
    env["CUDA_VISIBLE_DEVICES"] = ""  # it trains on the CPU: no CUDA context, no GPU memory
    env["PYTHONSAFEPATH"] = "1"  # not the working directory first on its path: the modules this process imports
    package_root = _package_root()
    if package_root is not None:  # lmlab from a source tree (an editable install, PYTHONPATH=src), as imported here
        env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    for stale in target.parent.glob(_staging(target, "*").name):  # a staging copy an earlier, killed build left
        shutil.rmtree(stale, ignore_errors=True)
    request = json.dumps({"config": cfg.model_dump(), "target": str(target), "progress": bool(display.progress),
                          "position": display.position, "parent": os.getpid()})
    child = subprocess.Popen([sys.executable, "-m", __name__, request], stdout=subprocess.PIPE, text=True, env=env,
                             stdin=subprocess.DEVNULL)
    try:
        for line in child.stdout:
            display.line(line.rstrip("\n"))
        child.wait()
    except BaseException:  # an interrupt or an error here: the child stops with us, not minutes later
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise
    finally:
        child.stdout.close()
    if child.returncode != 0:
        how = (f"it was killed by {signal.Signals(-child.returncode).name}" if child.returncode < 0 and
               -child.returncode in {s.value for s in signal.Signals} else
               f"exit code {child.returncode}; its error is above")
        raise RuntimeError(f"pretraining the tiny base '{cfg.name}' in its own process failed ({how})")
    if not (target / "lmlab_pretrain.json").exists():
        raise RuntimeError(f"pretraining the tiny base '{cfg.name}' ended without writing {target}")


def _package_root() -> str | None:
    """The directory lmlab is imported from, where it is not an installed site-packages (whose directory must not go
    ahead of the standard library on the pretraining process's path)."""
    import site

    import lmlab

    root = Path(lmlab.__file__).resolve().parent.parent
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    return None if root in installed else str(root)


def _staging(target: Path, pid: int | str | None = None) -> Path:
    """Where the process `pid` (default: this one) writes a base before renaming it to `target`."""
    return target.with_name(f"{target.name}.tmp{os.getpid() if pid is None else pid}")


def _pretrain_into(cfg: PretrainConfig, target: Path, display: Display) -> None:
    """Pretrain and save into `target`, in the process `_pretrain_in_own_process` starts (or, in tests, in this one)."""
    started = time.perf_counter()
    display.line(f"pretraining tiny base '{cfg.name}' ({cfg.model.arch}, {cfg.model.num_layers} layers, width "
                 f"{cfg.model.hidden_size}, context {cfg.model.context}) on built-in {cfg.data} data, on the CPU with "
                 f"{PRETRAIN_THREADS} thread and portable kernels (the same base on every x86-64 machine with this "
                 f"torch build); cached at {target}")
    tokenizer = train_bpe_tokenizer(tokenizer_texts(cfg.data, seed=cfg.tokenizer_seed), cfg.vocab_size)
    docs = _training_documents(cfg, tokenizer)
    texts = [getattr(d, "text", d) for d in docs]  # a LongDocument's text, or the text itself
    val_count = max(1, len(docs) // 20)
    train_docs, train_texts, val_texts = docs[val_count:], texts[val_count:], texts[:val_count]
    model = build_tiny(cfg.model, len(tokenizer), bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                       pad_id=tokenizer.pad_token_id, seed=cfg.init_seed)
    recall = _recall_phase(cfg, model, tokenizer, display) if cfg.recall_steps and cfg.data == "longdoc" else None
    if cfg.data == "longdoc" and cfg.recall_weight > 1:
        examples = recall_examples(train_docs, tokenizer, cfg.model.context, tokenizer.bos_token_id,
                                   end_id=tokenizer.eos_token_id, value_weight=cfg.recall_weight)
    else:  # documents end with EOS: generations learn to stop
        examples = chunk_examples(tokenize_documents(train_texts, tokenizer), cfg.model.context,
                                  tokenizer.bos_token_id, end_id=tokenizer.eos_token_id)
    result = train(model, examples, cfg.train, seed=cfg.init_seed, hooks=PaddedLM(tokenizer.pad_token_id),
                   display=display.named(f"pretrain {cfg.name}"), device=PRETRAIN_DEVICE)
    val = evaluate_perplexity(model, val_texts, tokenizer, cfg.model.context, positional=False)
    staging = _staging(target)
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    info = {"config": cfg.model_dump(), "key": cfg.key(), "final_train_loss": result.final_loss,
            "val_ppl": val["ppl"], "steps": result.steps, "train_time_s": result.train_time_s,
            "recall_phase": None if recall is None else {"steps": recall.steps, "final_loss": recall.final_loss,
                                                         "train_time_s": recall.train_time_s},
            "wall_time_s": time.perf_counter() - started, "device": PRETRAIN_DEVICE,
            # local time, as a run's study.yaml records its start: which run built it
            "built_at": datetime.now().isoformat(timespec="seconds"),
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl": torch.backends.mkl.is_available(), "mkl_cbwr_requested": os.environ.get("MKL_CBWR"),
            "lmlab_cpu_kernels": not kernels_disabled(),
            "versions": library_versions()}
    (staging / "lmlab_pretrain.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    display.line(f"pretrained '{cfg.name}': val ppl {val['ppl']:.2f} at context {cfg.model.context} "
                 f"({result.steps} steps, {info['wall_time_s']:.0f}s)")


def _main(argv: list[str]) -> int:
    """`python -m lmlab.studies.pretrain REQUEST`: the process `_pretrain_in_own_process` starts (REQUEST: its JSON).
    It ends with the process that started it (SIGTERM when that one dies, on Linux) and exits quietly when stopped:
    143 on SIGTERM, 130 on an interrupt, without a traceback and without a half-written base (the staging copy goes)."""
    import signal
    import sys

    request = json.loads(argv[0])
    _end_with_parent(request["parent"])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    target = Path(request["target"])
    try:
        from lmlab.progress import quiet_libraries

        quiet_libraries()  # as the process that started it: no library's own bars or advice
        cfg = PretrainConfig.model_validate(request["config"])
        display = Display(progress=request["progress"], position=request["position"],
                          log=lambda message: print(message, flush=True))
        with torch_threads(PRETRAIN_THREADS):
            _pretrain_into(cfg, target, display)
        sys.stdout.flush()
        return 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the process reading its messages is gone
        return 141
    finally:
        shutil.rmtree(_staging(target), ignore_errors=True)
        # from here on the process only exits: a signal now (its parent's death, a late Ctrl-C) ends it at once,
        # where raised inside an exit handler it would be printed as a traceback
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: os._exit(128 + signum))


def _end_with_parent(parent: int) -> None:
    """On Linux, ask the kernel to send this process SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), then exit
    at once if the parent is already gone. Elsewhere nothing: the parent stops it itself on its own way out."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        sys.exit(143)


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
