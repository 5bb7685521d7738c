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
from lmlab.progress import quiet_libraries

STUDIES = ("hylorada", "landmarks", "bucketing", "latentwire", "mu")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every other bad input."""

    def error(self, message: str):
        # argparse names an optional positional (run's KEY=VALUE overrides) among the missing ones, and the eval
        # subcommand by its dest: say what to give instead
        if message.startswith("the following arguments are required: study"):
            message = f"name a study: `lmlab run STUDY [KEY=VALUE ...]`, STUDY one of {', '.join(STUDIES)}"
        elif message == "the following arguments are required: {ppl,lm-eval}":
            message = "name what to evaluate: `lmlab eval ppl ...` (perplexity) or `lmlab eval lm-eval ...`"
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
    run.add_argument("--log", action="append", default=[], metavar="TRACKER",
                     help="log each cell to tensorboard, wandb and/or mlflow (repeatable or comma-separated; "
                          "pip install 'lmlab[tracking]')")
    run.add_argument("--parallel", metavar="N", help="cells computed at once, each in its own process on its own GPU "
                     "or share of the CPU cores: a number or 'auto' (one per GPU)")
    run.add_argument("--executor", choices=["slurm", "local"],
                     help="one submitit job per cell: on SLURM, or submitit's local executor")
    run.add_argument("--slurm-partition", help="SLURM partition of the cells' jobs")
    run.add_argument("--slurm-gpus-per-cell", type=int, help="GPUs per cell job (default 1 on SLURM)")
    run.add_argument("--slurm-cpus-per-cell", type=int, help="CPU cores per cell job")
    run.add_argument("--slurm-time", type=int, default=240, metavar="MINUTES", help="time limit per cell job")
    run.add_argument("--slurm-mem-gb", type=float, help="memory per cell job (GB)")
    run.add_argument("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
                     help="any other sbatch option, e.g. account=myproj or qos=high (repeatable)")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=1e-4")

    report = sub.add_parser("report", help="regenerate a run's report files from its results.jsonl")
    report.add_argument("dir")

    ev = sub.add_parser("eval", help="evaluate a model")
    ev_sub = ev.add_subparsers(dest="metric", required=True, parser_class=_Parser, metavar="{ppl,lm-eval}")
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

    lm = ev_sub.add_parser("lm-eval", help="lm-evaluation-harness tasks, in process (needs lmlab[lmeval])")
    lm.add_argument("--model", required=True, help="a save_pretrained directory (or hub id where online)")
    lm.add_argument("--adapter", help="an adapter directory (lmlab or peft format)")
    lm.add_argument("--merge", action="store_true", help="fold the adapter into the weights first (LoRA/rsLoRA/DoRA)")
    lm.add_argument("--tasks", required=True, help="comma-separated task or group names, e.g. hellaswag,arc_easy")
    lm.add_argument("--limit", type=int, help="at most N examples per task")
    lm.add_argument("--include-path", help="a directory of task YAML files (tasks of your own, e.g. over local data)")
    lm.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    lm.add_argument("--batch-size", type=int, default=8)
    lm.add_argument("--bootstrap-iters", type=int, default=100_000,
                    help="lm-eval's bootstrap for standard errors without a closed form (0: skip them)")
    lm.add_argument("--trust-remote-code", action="store_true")
    lm.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")

    summ = sub.add_parser("summarize-eval", help="valid vs invalid answers per system in eval_samples JSONL files")
    summ.add_argument("paths", nargs="+")

    bench = sub.add_parser("bench", help="side-by-side performance benchmarks (writes benchmarks/results/)")
    bench.add_argument("--quick", action="store_true", help="fewer repeats (for a fast look, not for the README)")
    bench.add_argument("--only", nargs="*", help="run only these benchmarks (with --gpu: these models)")
    bench.add_argument("--out", help="directory for the results (default benchmarks/results)")
    bench.add_argument("--gpu", action="store_true", help="the GPU benchmarks against peft (default where CUDA is "
                       "available and --only names no CPU benchmark)")
    bench.add_argument("--lengths", help="--gpu: sequence lengths of the long-context probe, e.g. 32k,64k,128k "
                       "(none: skip it)")
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


def _eval_lm(args) -> int:
    """`lmlab eval lm-eval`: the model (with its adapter, merged or not) through lm-eval's HFLM; its results JSON."""
    from lmlab.eval.harness import is_directory, require_lm_eval, run_lm_eval, task_manager
    from lmlab.models.hf import load_causal_lm, load_tokenizer

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise LmlabError("--tasks needs at least one task name, e.g. --tasks hellaswag,arc_easy")
    for flag, value, least in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1),
                               ("--num-fewshot", args.num_fewshot, 0), ("--bootstrap-iters", args.bootstrap_iters, 0)):
        if value is not None and value < least:
            raise LmlabError(f"{flag} must be >= {least}, got {value}")
    if args.merge and not args.adapter:
        raise LmlabError("--merge folds an adapter into the weights: give it with --adapter")
    if args.include_path is not None and not is_directory(args.include_path):
        raise LmlabError(f"--include-path {args.include_path} is not a directory (of lm-eval task YAML files)")
    require_lm_eval()
    task_manager(tasks, args.include_path)  # unknown tasks: one line, before the model loads
    model = load_causal_lm(args.model, trust_remote_code=args.trust_remote_code)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    if args.adapter:  # with the context extension it was trained with, as `lmlab eval ppl`
        from lmlab.errors import ConfigError
        from lmlab.hylorada import load_adapter, merge_adapter

        model = load_adapter(model, args.adapter)
        if args.merge:
            try:
                model = merge_adapter(model)
            except ConfigError as exc:
                raise LmlabError(f"--merge: {exc}; evaluate it unmerged (without --merge)") from None
    from lmlab.engine.distributed import device

    model.to(device())
    results = run_lm_eval(model, tokenizer, tasks, limit=args.limit, include_path=args.include_path,
                          batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                          bootstrap_iters=args.bootstrap_iters)
    results.setdefault("config", {}).update(model=args.model, adapter=args.adapter, merged=bool(args.merge))
    print(json.dumps(results, indent=2))
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
    # `--` ends torchrun's own options: without it torchrun's parser reads lmlab's `--log` as an ambiguous
    # abbreviation of its `--log-dir` / `--logs-specs`; the child drops the `--` if it is passed through (`main`)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lmlab.cli", "--", *cleaned]
    return subprocess.call(cmd)


def _run(args, argv: list[str]) -> int:
    from lmlab.engine import distributed as D

    nproc = D.resolve_nproc(args.nproc) if not os.environ.get("LOCAL_RANK") else 1
    if nproc > 1:
        from lmlab.studies.runner import check_run

        # every check of the input before N processes start: one line from here, not one per rank
        check_run(args.study, preset=args.preset, overrides=args.overrides, out=args.out, seeds=args.seeds,
                  resume=args.resume, parallel=args.parallel, executor=_executor_options(args), log=args.log,
                  world=nproc)
        return _relaunch_distributed(nproc, argv)
    from lmlab.studies.runner import run_study

    D.init_from_env()
    main_process = D.is_main()  # asked before shutdown: after it every rank would answer rank 0
    try:
        out = run_study(args.study, preset=args.preset, overrides=args.overrides, out=args.out,
                        seeds=args.seeds, resume=args.resume, progress=not args.quiet, parallel=args.parallel,
                        executor=_executor_options(args), log=args.log)
    finally:
        D.shutdown()
    if main_process:
        print(f"report: {out / 'report.md'}")
    return 0


def _executor_options(args):
    """`--executor` and its `--slurm-*` options (None: cells run in this process or its `--parallel` workers)."""
    from lmlab.studies.parallel import ExecutorOptions

    given = [f"--{name.replace('_', '-')}" for name in ("slurm_partition", "slurm_gpus_per_cell",
                                                       "slurm_cpus_per_cell", "slurm_mem_gb")
             if getattr(args, name) is not None] + (["--slurm-option"] if args.slurm_option else [])
    if args.executor is None:
        if given:
            raise LmlabError(f"{', '.join(given)} configure the jobs of --executor slurm; add --executor slurm")
        return None
    extra = {}
    for item in args.slurm_option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LmlabError(f"--slurm-option takes KEY=VALUE (an sbatch option without its dashes), got {item!r}")
        extra[key.strip().lstrip("-")] = value
    return ExecutorOptions(kind=args.executor, partition=args.slurm_partition, gpus_per_cell=args.slurm_gpus_per_cell,
                           cpus_per_cell=args.slurm_cpus_per_cell, time_min=args.slurm_time, mem_gb=args.slurm_mem_gb,
                           extra=extra or None)


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
    if argv[:1] == ["--"] and os.environ.get("LOCAL_RANK"):  # relaunched under torchrun (`_relaunch_distributed`)
        argv = argv[1:]
    _share_cpu(argv)
    quiet_libraries()
    try:
        args, extra = build_parser().parse_known_args(argv)
        # `key=value` overrides may come after options (`run hylorada --seeds 2 lr=1e-3`).
        unknown = [x for x in extra if not (args.command == "run" and "=" in x and not x.startswith("-"))]
        if unknown:
            bare = [x for x in unknown if not x.startswith("-")] if args.command == "run" else []
            raise LmlabError(f"unrecognized arguments: {' '.join(unknown)}"
                             + (f" (a config override is KEY=VALUE, e.g. {bare[0]}=...)" if bare else
                                " (see `lmlab --help`)"))
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
            return _eval_lm(args) if args.metric == "lm-eval" else _eval_ppl(args)
        if args.command == "summarize-eval":
            from lmlab.latentwire.evaluate import format_eval_summary, summarize_eval

            print(format_eval_summary(summarize_eval(args.paths)))
            return 0
        if args.command == "bench":
            from lmlab.bench import run_benchmarks

            path = run_benchmarks(quick=args.quick, only=args.only, out=args.out, gpu=args.gpu or None,
                                  lengths=args.lengths)
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
