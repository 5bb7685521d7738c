"""The `lmlab` command (docs/architecture.md section 5, interface contract).

Exit codes: 0 success; 2 bad usage, config or input (one line on stderr, no traceback); 1 an
unexpected failure; 130/143 interrupted (finished work is kept; `--resume` continues).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from lmlab.errors import LmlabError

STUDIES = ("hylorada", "landmarks", "bucketing", "latentwire", "mu")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every other bad input."""

    def error(self, message: str):
        raise LmlabError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmlab", description="Honest studies of efficient language-model methods.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run every configuration x seed of a study")
    run.add_argument("study", choices=STUDIES)
    run.add_argument("--preset", help="smoke | default | paper, or a YAML file (default: default)")
    run.add_argument("--out", help="run directory (default runs/<study>-<YYYYmmdd-HHMMSS>)")
    run.add_argument("--seeds", type=int, help="number of seeds: the first N of 42, 123, 456, 789, 1011, ...")
    run.add_argument("--resume", metavar="DIR", help="finish an interrupted run; finished cells are kept")
    run.add_argument("--nproc", default="1", help="processes (DDP via torchrun): a number or 'auto'")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--threads", type=int, help="CPU threads per process for torch (default: torch's choice)")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=1e-4")

    report = sub.add_parser("report", help="regenerate a run's report files from its results.jsonl")
    report.add_argument("dir")

    ev = sub.add_parser("eval", help="evaluate a model")
    ev_sub = ev.add_subparsers(dest="metric", required=True, parser_class=_Parser)
    ppl = ev_sub.add_parser("ppl", help="corpus perplexity and bits per byte of text files")
    ppl.add_argument("--model", required=True, help="a save_pretrained directory (or hub id where online)")
    ppl.add_argument("--adapter", help="an adapter directory (lmlab or peft format)")
    ppl.add_argument("--data", required=True, nargs="+", help="UTF-8 text files, each one document")
    ppl.add_argument("--max-length", type=int, required=True)
    ppl.add_argument("--stride", type=int, help="default: --max-length")
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--positional", action="store_true",
                     help="per-decile perplexity and LIM-PPL even when stride != max-length (an extra pass)")
    ppl.add_argument("--trust-remote-code", action="store_true")
    ppl.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")

    summ = sub.add_parser("summarize-eval", help="valid vs invalid answers per system in eval_samples JSONL files")
    summ.add_argument("paths", nargs="+")

    bench = sub.add_parser("bench", help="side-by-side performance benchmarks (writes benchmarks/results/)")
    bench.add_argument("--quick", action="store_true", help="fewer repeats (for a fast look, not for the README)")
    bench.add_argument("--only", nargs="*", help="run only these benchmarks")
    bench.add_argument("--out", help="directory for the results (default benchmarks/results)")
    return parser


def _eval_ppl(args) -> int:
    import torch

    from lmlab.data.sources import read_text_file
    from lmlab.eval.perplexity import evaluate_perplexity
    from lmlab.models.hf import learned_positions, load_causal_lm, load_tokenizer

    if args.max_length < 1:
        raise LmlabError(f"--max-length must be >= 1, got {args.max_length}")
    stride = args.max_length if args.stride is None else args.stride
    if not 1 <= stride <= args.max_length:
        raise LmlabError(f"--stride must be between 1 and --max-length ({args.max_length}), got {stride}")
    if args.batch_size < 1:
        raise LmlabError(f"--batch-size must be >= 1, got {args.batch_size}")
    docs = [read_text_file(Path(p)) for p in args.data]
    model = load_causal_lm(args.model, trust_remote_code=args.trust_remote_code)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    if args.adapter:  # with the context extension it was trained with (RoPE scaling, a stretched position table)
        from lmlab.hylorada import load_adapter

        model = load_adapter(model, args.adapter)
    positions = learned_positions(model.config)
    if positions is not None and args.max_length > positions:
        raise LmlabError(f"--max-length {args.max_length} exceeds the model's {positions} learned positions "
                         f"(n_positions); use --max-length {positions} or less")
    _warn_beyond_positions(model.config, args.max_length)
    from lmlab.engine.distributed import device

    model.to(device())
    positional = args.positional or stride == args.max_length  # free when the windows coincide
    with torch.inference_mode():
        result = evaluate_perplexity(model, docs, tokenizer, args.max_length, stride=stride,
                                     batch_size=args.batch_size, positional=positional)
    result["model"] = args.model
    if args.adapter:
        result["adapter"] = args.adapter
    print(json.dumps(result))
    return 0


def _warn_beyond_positions(config, max_length: int) -> None:
    """One line on stderr when windows are longer than the positions the model was built for (RoPE models run
    past them, but what they compute there is extrapolation); dynamic RoPE scaling extends itself."""
    from lmlab.models.hf import context_length

    positions = context_length(config)
    rope = getattr(config, "rope_parameters", None)
    if positions is None or max_length <= positions or (isinstance(rope, dict) and rope.get("rope_type") == "dynamic"):
        return
    print(f"lmlab: warning: --max-length {max_length} exceeds the model's {positions} positions "
          "(max_position_embeddings): beyond them it extrapolates, unless it was fine-tuned at that length",
          file=sys.stderr)


def _check_batch_split(args, nproc: int) -> None:
    """Before `nproc` processes start: the study's train.batch_size (the global batch) splits evenly across them.
    One line here instead of one error per process and torchrun's report."""
    from lmlab.config import build, load_config, preset_path
    from lmlab.engine.train import check_batch_split
    from lmlab.studies.rundir import RunDir
    from lmlab.studies.runner import get_study

    study = get_study(args.study)
    if args.resume:
        run = RunDir(Path(args.resume))
        config = build(study.config_cls, run.read_study()["config"], where=str(run.study_path))
    else:
        config = load_config(study.config_cls, preset_path(args.study, args.preset or "default"), args.overrides)
    check_batch_split(config, nproc)


def _relaunch_distributed(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with `nproc` processes (gloo on CPU, NCCL on GPU)."""
    import subprocess

    cleaned, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = i + 1 < len(argv)
            continue
        if a.startswith("--nproc="):
            continue
        cleaned.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lmlab.cli", *cleaned]
    return subprocess.call(cmd)


def _run(args, argv: list[str]) -> int:
    from lmlab.engine import distributed as D

    nproc = D.resolve_nproc(args.nproc) if not os.environ.get("LOCAL_RANK") else 1
    if nproc > 1:
        _check_batch_split(args, nproc)
        return _relaunch_distributed(nproc, argv)
    from lmlab.studies.runner import run_study

    D.init_from_env()
    main_process = D.is_main()  # asked before shutdown: after it every rank would answer rank 0
    try:
        out = run_study(args.study, preset=args.preset, overrides=args.overrides, out=args.out,
                        seeds=args.seeds, resume=args.resume, progress=not args.quiet)
    finally:
        D.shutdown()
    if main_process:
        print(f"report: {out / 'report.md'}")
    return 0


def _quiet_libraries() -> None:
    """Our progress bars and lines only: no per-load progress bars or advisory warnings from libraries."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _share_cpu(argv: list[str]) -> None:
    """Before torch loads: on a machine where other processes are running, fewer torch threads that sleep when
    idle (lmlab.cpu_share; a user's own --threads / OMP_* settings win). Only for the commands that compute."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in ("run", "eval"):
        return
    from lmlab.cpu_share import share_cpu

    # said by the run once its input is checked (a bad command's error stays its only line)
    share_cpu(any(a == "--threads" or a.startswith("--threads=") for a in argv))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _share_cpu(argv)
    _quiet_libraries()
    try:
        args, extra = build_parser().parse_known_args(argv)
        # `key=value` overrides may come after options (`run hylorada --seeds 2 lr=1e-3`).
        unknown = [x for x in extra if not (args.command == "run" and "=" in x and not x.startswith("-"))]
        if unknown:
            raise LmlabError(f"unrecognized arguments: {' '.join(unknown)} (see `lmlab --help`)")
        if args.command == "run":
            args.overrides = [*args.overrides, *extra]
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise LmlabError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        if args.command == "run":
            return _run(args, argv)
        if args.command == "report":
            from lmlab.studies.report import regenerate

            out = regenerate(Path(args.dir))
            print(f"report: {out / 'report.md'}")
            return 0
        if args.command == "eval":
            return _eval_ppl(args)
        if args.command == "summarize-eval":
            from lmlab.latentwire.evaluate import format_eval_summary, summarize_eval

            print(format_eval_summary(summarize_eval(args.paths)))
            return 0
        if args.command == "bench":
            from lmlab.bench import run_benchmarks

            path = run_benchmarks(quick=args.quick, only=args.only, out=args.out)
            print(f"results: {path}")
            return 0
    except LmlabError as exc:
        one_line = " ".join(str(exc).splitlines())  # a message may quote user text holding a line break
        # ...or undecodable bytes of an argument or file name (surrogates): shown escaped, never a crash
        one_line = one_line.encode("utf-8", "backslashreplace").decode("utf-8")
        print(f"lmlab: error: {one_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        run_dir = getattr(exc, "run_dir", None)
        if run_dir is not None:
            print(f"lmlab: interrupted; finished cells are kept - continue with `lmlab run "
                  f"{getattr(exc, 'study', 'STUDY')} --resume {shlex.quote(str(run_dir))}`", file=sys.stderr)
        else:
            print("lmlab: interrupted", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)
    return 1


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
