"""The ``hvdllm`` command.

    hvdllm train --config FILE.toml [--set section.key=value ...]
    hvdllm convert --from-hf DIR --out CKPT | --to-hf CKPT --out DIR
    hvdllm generate --checkpoint DIR --prompt TEXT [--max-new-tokens N] ...
    hvdllm plot RUN_DIR [RUN_DIR ...] --out FILE.png [--title T]
    hvdllm tokenizer train CORPUS... --vocab-size N --out DIR
    hvdllm prepare CORPUS... --tokenizer T --out DIR [--workers N]
    hvdllm plan --config FILE.toml --world N [--memory-per-rank GB] [--calibrate]
    hvdllm timeline RUN_DIR [--out FILE.json]
    hvdllm info

``train`` runs as a single process, under ``horovodrun -np N -H localhost:N``
or under ``mpirun -np N``.  Errors caused by input (bad config, missing
data, missing build) print one line, ``hvdllm: error: ...``, and exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__, cli_data, cli_plan
from .common.errors import HvdllmError

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hvdllm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train GPT-style language models with Horovod and MPI (PyTorch or "
                    "TensorFlow/Keras 3).",
        epilog="examples:\n"
               "  hvdllm train --config configs/example.toml --set parallel.dp=1\n"
               "  horovodrun -np 2 -H localhost:2 hvdllm train --config configs/example.toml\n"
               "  mpirun -np 4 hvdllm train --config configs/example.toml --set parallel.dp=4\n"
               "  hvdllm convert --from-hf ./gpt2 --out ckpt/gpt2\n"
               "  hvdllm convert --to-hf ckpt/gpt2 --out ./gpt2-hf\n"
               "  hvdllm generate --checkpoint runs/demo --prompt 'Once upon a time'\n"
               "  hvdllm plot runs/demo runs/other --out curves.png\n"
               "  hvdllm tokenizer train corpus/ --vocab-size 4096 --out tok/\n"
               "  hvdllm prepare corpus/ --tokenizer tok/ --out prepared/\n"
               "  hvdllm plan --config configs/example.toml --world 8 --hardware a100-80g\n"
               "  hvdllm timeline runs/demo")
    parser.add_argument("--version", action="version", version=f"hvdllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model from a TOML config")
    train.add_argument("--config", help="TOML config file (defaults apply to missing keys)")
    train.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
    convert = sub.add_parser(
        "convert", help="convert a checkpoint between Hugging Face and hvdllm formats",
        description="Convert a GPT-2 or LLaMA checkpoint between a Hugging Face directory "
                    "(config.json + safetensors) and an hvdllm checkpoint directory "
                    "(model.toml + model.safetensors).  The output directory must not exist "
                    "(or be empty); it appears only once complete.")
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="Hugging Face directory to read")
    source.add_argument("--to-hf", metavar="CKPT", help="hvdllm checkpoint to read")
    convert.add_argument("--out", required=True, metavar="PATH",
                         help="directory to write (an hvdllm checkpoint, or a Hugging Face "
                              "directory with --to-hf)")
    generate = sub.add_parser(
        "generate", help="continue a prompt from a checkpoint (one process, no MPI)",
        description="Load a training checkpoint (output.dir, its checkpoints/ or one "
                    "checkpoints/step-N, any dp x tp x pp layout, either framework) or an "
                    "hvdllm model checkpoint (e.g. from convert --from-hf) and print the "
                    "prompt followed by its continuation.  Decoding uses a key/value cache; "
                    "past model.seq_len tokens the context slides (the last seq_len tokens).")
    generate.add_argument("--checkpoint", required=True, metavar="DIR",
                          help="training or model checkpoint directory")
    generate.add_argument("--prompt", required=True, metavar="TEXT", help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                          help="tokens to generate (default 64)")
    generate.add_argument("--temperature", type=float, default=0.8, metavar="T",
                          help="sampling temperature; 0 = greedy (default 0.8)")
    generate.add_argument("--top-k", type=int, default=40, metavar="K",
                          help="sample among the K most likely tokens; 0 = all (default 40)")
    generate.add_argument("--seed", type=int, default=0, metavar="S",
                          help="sampler seed (default 0)")
    generate.add_argument("--framework", choices=("torch", "tensorflow"),
                          help="framework to run in (default: the checkpoint's, else torch)")
    generate.add_argument("--tokenizer", metavar="T",
                          help="\"bytes\" or a tokenizer.json (or its directory); default: "
                               "the checkpoint run's data.tokenizer, else bytes")
    plot = sub.add_parser(
        "plot", help="draw the training curves of one or more runs into an image",
        description="Read each run directory's metrics.jsonl (and config.toml for the tokens "
                    "axis) and draw loss and validation loss (dashed) vs step, loss vs tokens "
                    "and tokens/s vs step, one colour per run.")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run's output.dir")
    plot.add_argument("--out", required=True, metavar="FILE.png", help="image to write")
    plot.add_argument("--title", help="title above the plots")
    cli_data.add_parsers(sub)
    cli_plan.add_parsers(sub)
    sub.add_parser("info", help="print versions and what Horovod was built with")
    return parser


def _world_rank() -> int:
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "HOROVOD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _info() -> int:
    import platform

    print(f"hvdllm {__version__} on Python {platform.python_version()}")
    for name in ("numpy", "mpi4py", "torch", "tensorflow", "keras", "horovod"):
        try:
            mod = __import__(name)
            print(f"  {name:<10} {getattr(mod, '__version__', '?')}")
        except Exception as exc:  # report, do not fail
            print(f"  {name:<10} missing ({str(exc).splitlines()[0]})")
    try:
        from mpi4py import MPI

        print(f"  MPI        {MPI.Get_library_version().splitlines()[0].rstrip(chr(0))}")
    except Exception as exc:
        print(f"  MPI        missing ({exc})")
    for fw, mod in (("torch", "horovod.torch"), ("tensorflow", "horovod.tensorflow")):
        try:
            __import__(mod)
            print(f"  {mod:<18} available")
        except Exception as exc:
            print(f"  {mod:<18} missing ({str(exc).splitlines()[0]})")
    return 0


def _convert(args: argparse.Namespace) -> int:
    """``hvdllm convert``: numpy only, no framework is imported."""
    from .common.checkpoint import load_checkpoint, save_checkpoint
    from .common.hf import load_hf_checkpoint, save_hf_checkpoint

    if args.from_hf:
        cfg, tensors = load_hf_checkpoint(args.from_hf)
        save_checkpoint(args.out, cfg, tensors)
        kind = "hvdllm checkpoint"
    else:
        cfg, tensors = load_checkpoint(args.to_hf)
        save_hf_checkpoint(args.out, cfg, tensors)
        kind = "Hugging Face checkpoint"
    count = sum(int(t.size) for t in tensors.values())
    print(f"wrote {kind} {args.out}: {cfg.family}, {cfg.n_layer} layers, d_model "
          f"{cfg.d_model}, vocab {cfg.vocab_size}, {count:,} parameters")
    return 0


def _report(exc: HvdllmError) -> int:
    """Print a user error once (rank 0, or each failing rank if not all failed)."""
    rank = _world_rank()
    if type(exc).__name__ == "PeerSetupError":
        return EXIT_USAGE  # the rank that failed prints the reason
    if type(exc).__name__ == "Preempted":  # not an error: the run stopped after a save
        if rank == 0:
            print(f"hvdllm: {exc}", file=sys.stderr, flush=True)
        return int(getattr(exc, "exit_code", EXIT_USAGE))
    if rank == 0 or not getattr(exc, "all_ranks", True):
        prefix = "hvdllm: error: " if rank == 0 else f"hvdllm: error (rank {rank}): "
        print(prefix + str(exc), file=sys.stderr, flush=True)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "info":
        return _info()
    if args.command == "generate":
        try:
            from .generate import generate_text

            text = generate_text(args.checkpoint, args.prompt, args.max_new_tokens,
                                 args.temperature, args.top_k, args.seed, args.framework,
                                 args.tokenizer)
        except HvdllmError as exc:
            return _report(exc)
        print(text, flush=True)
        return 0
    if args.command == "plot":
        try:
            from .common.plot import plot_runs

            runs = plot_runs(args.runs, args.out, args.title)
        except HvdllmError as exc:
            return _report(exc)
        print(f"wrote {args.out}: {len(runs)} run(s)")
        return 0
    if args.command in cli_plan.COMMANDS:
        try:
            return cli_plan.run(args)
        except HvdllmError as exc:
            return _report(exc)
    if args.command in cli_data.COMMANDS:
        try:
            return cli_data.run(args)
        except HvdllmError as exc:
            return _report(exc)
    if args.command == "convert":
        try:
            return _convert(args)
        except HvdllmError as exc:
            return _report(exc)
    from .common.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except HvdllmError as exc:  # same on every rank: nothing to agree on
        return _report(exc)
    from .train.runner import train

    try:
        train(cfg)
    except HvdllmError as exc:
        from mpi4py import MPI

        if getattr(exc, "agreed", False) or MPI.COMM_WORLD.Get_size() == 1:
            return _report(exc)
        raise  # a run-time error on some ranks: the failure handler ends the job
    return 0


if __name__ == "__main__":
    sys.exit(main())
