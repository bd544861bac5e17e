"""``hvdllm tokenizer train`` and ``hvdllm prepare``: the data commands of the CLI.

    hvdllm tokenizer train CORPUS... --vocab-size N --out DIR [--min-frequency K]
    hvdllm prepare CORPUS... --tokenizer T --out DIR [--workers N] [--piece-mb M]

``prepare`` runs in one process with ``--workers`` processes, or under
``mpirun -np N`` with the ranks sharing the work.
"""
from __future__ import annotations

import argparse
import time

COMMANDS = ("tokenizer", "prepare")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    train = tok_sub.add_parser(
        "train", help="train a byte-level BPE (Hugging Face tokenizers) on text files",
        description="Train a byte-level BPE with Hugging Face tokenizers and write "
                    "DIR/tokenizer.json; use it with data.tokenizer = \"DIR\".")
    train.add_argument("corpus", nargs="+", metavar="CORPUS",
                       help="text files or directories (read recursively)")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N",
                       help="vocabulary size, >= 257 (256 bytes + <|endoftext|>)")
    train.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    train.add_argument("--min-frequency", type=int, default=2, metavar="K",
                       help="merge only pairs seen at least K times (default 2)")
    prep = sub.add_parser(
        "prepare", help="tokenize a corpus once into memory-mapped token shards",
        description="Tokenize text files once into uint16/uint32 token shards plus an index; "
                    "train on them with data.path = \"DIR\" and the same data.tokenizer.  "
                    "Parallel over --workers processes, or over the ranks of mpirun.")
    prep.add_argument("corpus", nargs="+", metavar="CORPUS",
                      help="text files or directories (read recursively, sorted)")
    prep.add_argument("--tokenizer", default="bytes", metavar="T",
                      help="\"bytes\" (default), a tokenizer.json or a directory holding one")
    prep.add_argument("--out", required=True, metavar="DIR",
                      help="directory to write (new, empty, or an earlier prepared corpus)")
    prep.add_argument("--workers", type=int, default=0, metavar="N",
                      help="worker processes (default: one per core; ignored under mpirun)")
    prep.add_argument("--piece-mb", type=float, default=64.0, metavar="M",
                      help="text per shard, MB (default 64)")


def run(args: argparse.Namespace) -> int:
    """Run a data command; raises :class:`hvdllm.common.errors.HvdllmError` on bad input."""
    from .common.errors import ConfigError

    if args.command == "tokenizer":
        from .common.tokenizer import load_tokenizer, train_bpe

        t0 = time.perf_counter()
        path = train_bpe(args.corpus, args.vocab_size, args.out, args.min_frequency)
        tok = load_tokenizer(str(path))
        print(f"wrote {path}: byte-level BPE, vocabulary {tok.vocab_size} "
              f"({time.perf_counter() - t0:.1f}s); set data.tokenizer = \"{args.out}\" and "
              f"model.vocab_size >= {tok.vocab_size}")
        return 0
    from .common.shards import prepare

    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    if args.piece_mb <= 0:
        raise ConfigError(f"--piece-mb must be > 0, got {args.piece_mb:g}")
    t0 = time.perf_counter()
    index = prepare(args.corpus, args.tokenizer, args.out, workers=args.workers,
                    piece_bytes=int(args.piece_mb * (1 << 20)))
    if index is not None:
        from .cli import _world_rank

        if _world_rank() == 0:
            print(f"wrote {args.out}: {index['tokens']:,} tokens ({index['dtype']}) in "
                  f"{len(index['shards'])} shard(s) from {index['documents']} file(s), "
                  f"{time.perf_counter() - t0:.1f}s; train with data.path = \"{args.out}\"")
    return 0
