"""What stale gradients cost, without a parameter server: one process, delayed AdamW.

    python benchmarks/ps_delay_replay.py [--lr 3e-4 1e-3] [--delays 0 2 4] [--steps 150]

Trains the ``ps_straggler.py`` model (GPT, 2 layers, d 64, seq 64, batch 24)
in one process, one thread.  Step ``c``'s gradient is taken on the
parameters of step ``c - d`` (the update history is replayed exactly), as a
parameter-server replica ``d`` steps stale computes it, and AdamW applies it
to the current parameters.  With ``extrapolate`` the stale parameters are
first moved on by ``d`` times the update that made them, as
``parallel.ps_compensation = "extrapolate"`` has the servers do.  Prints
the loss (10-step mean) at 50, 100 and the last step, and for each delay
the share of its loss gap to ``d = 0`` that extrapolation takes back.
No timing: the figures are deterministic.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

MODEL = ["model.family=gpt", "model.n_layer=2", "model.d_model=64", "model.n_head=4",
         "model.seq_len=64", "train.global_batch_size=24", "train.micro_batch_size=24"]


def replay(lr: float, delay: int, extrapolate: bool, steps: int) -> list[float]:
    import torch

    from hvdllm.common.config import load_config
    from hvdllm.common.data import ShardedBatchSampler, load_datasets
    from hvdllm.torch.engine import build_model, build_optimizer

    cfg = load_config(None, MODEL + [f"train.lr={lr}"])
    windows, _ = load_datasets(cfg.data.path, cfg.data.val_fraction, cfg.data.val_path,
                               cfg.model.seq_len, cfg.data.tokenizer)
    model = build_model(cfg)
    stale = build_model(cfg)
    opt = build_optimizer(model, cfg)
    sampler = ShardedBatchSampler(len(windows), 24, 24, 0, 1, cfg.train.seed)
    params = list(model.parameters())
    history = [[p.detach().clone() for p in params]]  # versions, newest last
    losses = []
    for _ in range(steps):
        (indices,) = sampler.next_step()
        x, y = (torch.as_tensor(a).long() for a in windows.batch(indices))
        at = max(0, len(history) - 1 - delay)
        with torch.no_grad():
            for i, q in enumerate(stale.parameters()):
                q.copy_(history[at][i])
                if extrapolate and delay and at > 0:
                    q.add_((history[at][i] - history[at - 1][i]) * delay)
        stale.zero_grad(set_to_none=True)
        loss = stale.loss(x, y)
        loss.backward()
        for p, q in zip(params, stale.parameters()):
            p.grad = q.grad.clone()
        opt.step()
        history.append([p.detach().clone() for p in params])
        del history[:-(delay + 2)]
        losses.append(loss.item())
    return losses


def mean_at(losses: list[float], step: int) -> float:
    return float(np.mean(losses[max(0, step - 10):step]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lr", type=float, nargs="+", default=[3e-4, 1e-3])
    ap.add_argument("--delays", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    marks = [50, 100, args.steps]
    print(f"{'lr':>8} {'delay':>5} {'pulls':<12}" + "".join(f"{'@' + str(m):>8}" for m in marks))
    for lr in args.lr:
        fresh = None
        for delay in args.delays:
            rows = {}
            for extrapolate in ([False, True] if delay else [False]):
                losses = replay(lr, delay, extrapolate, args.steps)
                rows[extrapolate] = losses
                name = "extrapolate" if extrapolate else "as pulled"
                print(f"{lr:8.0e} {delay:5d} {name:<12}"
                      + "".join(f"{mean_at(losses, m):8.3f}" for m in marks), flush=True)
            if delay == 0:
                fresh = rows[False]
            elif fresh is not None:
                for m in marks[1:]:
                    gap = mean_at(rows[False], m) - mean_at(fresh, m)
                    left = mean_at(rows[True], m) - mean_at(fresh, m)
                    if gap > 0:
                        print(f"{'':8} {'':5} gap to d=0 at step {m}: {gap:.3f} as pulled, "
                              f"{left:.3f} extrapolated ({1 - left / gap:.0%} taken back)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
