"""``hvdllm plan``'s picks for published models on A100 clusters, as a markdown table.

    python benchmarks/plan_paper_scale.py [--hardware a100-80g]

GPT-2 1.5B (batch 512 x 1024 tokens, as GPT-2 was trained), LLaMA 7B
(2048 x 2048, 4M tokens as in the LLaMA paper) and LLaMA 2 70B (1024 x 4096,
4M tokens) on 8, 64 and 512 GPUs: 80 GB each, NVLink within a node of 8,
200 Gb/s across (the ``a100-80g`` preset), bf16.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvdllm.common import planner as P  # noqa: E402
from hvdllm.common.config import build_config  # noqa: E402
from hvdllm.common.errors import ConfigError  # noqa: E402

MODELS = {
    "GPT-2 1.5B": dict(model=dict(family="gpt", n_layer=48, n_head=25, d_model=1600,
                                  seq_len=1024, vocab_size=50257),
                       train=dict(global_batch_size=512)),
    "LLaMA 7B": dict(model=dict(family="llama", n_layer=32, n_head=32, d_model=4096,
                                d_ff=11008, seq_len=2048, vocab_size=32000),
                     train=dict(global_batch_size=2048)),
    "LLaMA 2 70B": dict(model=dict(family="llama", n_layer=80, n_head=64, n_kv_head=8,
                                   d_model=8192, d_ff=28672, seq_len=4096, vocab_size=32000),
                        train=dict(global_batch_size=1024)),
}
WORLDS = (8, 64, 512)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hardware", default="a100-80g", choices=sorted(P.PRESETS))
    args = ap.parse_args()
    hw = P.PRESETS[args.hardware]
    print(f"hardware: {hw.name}\n")
    print("| model | GPUs | pick | memory GB | step s | MFU | valid / fitting layouts | plan s |")
    print("|---|---|---|---|---|---|---|---|")
    from hvdllm.train.mfu import flops_per_token

    for name, spec in MODELS.items():
        spec = {k: dict(v) for k, v in spec.items()}
        spec["train"].update(micro_batch_size=1, precision="bf16")
        cfg = build_config(spec)
        for world in WORLDS:
            start = time.perf_counter()
            try:
                result = P.plan(cfg, world, hw)
            except ConfigError as exc:
                print(f"| {name} | {world} | none: {exc} | | | | | |")
                continue
            took = time.perf_counter() - start
            best = result.best
            peak = hw.matmul[-1][1] / 0.6  # the preset's dense peak
            mfu = best.tokens_per_sec * flops_per_token(cfg.model) / world / peak
            print(f"| {name} | {world} | {best.layout.short()} | {best.memory.total / P.GB:.1f} "
                  f"| {best.time.total:.2f} | {mfu * 100:.0f}% | {len(result.candidates)} / "
                  f"{len(result.fitting)} | {took:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
