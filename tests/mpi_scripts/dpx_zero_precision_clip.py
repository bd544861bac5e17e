"""Run under mpirun -np 2 or 4: ZeRO-1, fp16 loss-scale agreement and global-norm clipping.

* ZeRO-1 over the world-sized DP group matches torch.optim.AdamW fed the
  averaged gradients (and the same clipping) to 1e-5 relative over 20
  steps; its optimizer state per rank is 1/dp of the unsharded state.
* fp16: an inf injected into ONE rank's gradients makes every rank skip
  that step and back off the loss scale; scales stay identical everywhere.
* Clipping over a manually tensor-parallel Linear stack (tp=2, with pp=2
  and dp=2 layouts too) gives the single-process torch norm and gradients.
"""
import torch
from mpi4py import MPI

from dpx_common import init_layouts, same_on_all_ranks
from hvdllm.common.loss_scale import DynamicLossScale
from hvdllm.torch.clip import TP_SHARDED_ATTR, clip_grad_norm_
from hvdllm.torch.precision import MixedPrecision
from hvdllm.torch.zero import zero_optimizer_from


def mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.GELU(), torch.nn.Linear(24, 10))


def adamw(model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=3e-3, betas=(0.9, 0.95), eps=1e-8)


def batch(step, rank):
    gen = torch.Generator().manual_seed(10_000 * step + rank)
    return torch.randn(6, 12, generator=gen), torch.randn(6, 10, generator=gen)


@torch.no_grad()
def relative_gap(model, ref):
    return max(float((a - b).abs().max() / b.abs().max())
               for a, b in zip(model.parameters(), ref.parameters()))


def check_zero(dp, hvd):
    p = dp.size
    model, ref = mlp(0), mlp(0)
    opt = zero_optimizer_from(adamw(model), dp, hvd)
    ref_opt = adamw(ref)
    clipped = 0
    for step in range(20):
        max_norm = 0.05 if step % 2 else 10.0  # clip on odd steps only
        lr = 3e-3 * (step + 1) / 20
        for g in opt.param_groups + ref_opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        x, y = batch(step, dp.rank)
        torch.nn.functional.mse_loss(model(x), y).backward()
        norm = opt.clip_grad_norm_(max_norm)
        opt.step()
        # Reference: one process, the average of every rank's gradient.
        ref_opt.zero_grad()
        for r in range(p):
            x, y = batch(step, r)
            (torch.nn.functional.mse_loss(ref(x), y) / p).backward()
        ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm))
        clipped += ref_norm > max_norm
        assert abs(norm - ref_norm) <= 1e-5 * ref_norm, (step, norm, ref_norm)
        ref_opt.step()
    assert clipped == 10, clipped
    worst = relative_gap(model, ref)
    assert worst <= 1e-5, worst
    for i, t in enumerate(model.parameters()):
        same_on_all_ranks(dp, t, f"parameter {i}")
    numel = sum(t.numel() for t in model.parameters())
    padded = -(-numel // p) * p
    assert opt.state_bytes() == 3 * 4 * padded // p, opt.state_bytes()
    moments = sum(v.numel() * v.element_size() for s in ref_opt.state.values()
                  for k, v in s.items() if k != "step")
    ratio = (opt.exp_avg.nbytes + opt.exp_avg_sq.nbytes) / moments
    assert abs(ratio - 1 / p) < 0.01, ratio
    return ratio, worst


def check_fp16_overflow(world):
    mp = MixedPrecision("fp16", world, loss_scale=DynamicLossScale(growth_interval=3))
    model = mlp(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bad_step, expect_scale, clean = 2, 2.0**16, 0
    for step in range(6):
        opt.zero_grad()
        x, y = batch(step, world.rank)
        with mp.autocast():
            out = model(x)
        assert out.dtype == torch.float16
        mp.scale_loss(torch.nn.functional.mse_loss(out.float(), y)).backward()
        if step == bad_step and world.rank == world.size - 1:
            model[0].weight.grad[0, 0] = float("inf")
        before = [t.detach().clone() for t in model.parameters()]
        found_inf = mp.unscale_(model.parameters())
        if not found_inf:
            opt.step()
        applied = mp.update(found_inf)
        assert found_inf == (step == bad_step) and applied == (not found_inf), (step, found_inf)
        changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert changed == applied, (step, changed)
        # The rules, step by step: back off on overflow, grow after 3 clean steps.
        clean = 0 if found_inf else clean + 1
        expect_scale = expect_scale / 2 if found_inf else expect_scale
        if clean == 3:
            expect_scale, clean = expect_scale * 2, 0
        assert mp.scale == expect_scale, (step, mp.scale, expect_scale)
        assert len(set(world.comm.allgather(mp.scale))) == 1, "loss scales differ across ranks"
    assert mp.loss_scale.skipped_steps == 1
    bf16 = MixedPrecision("bf16", world)
    with bf16.autocast():
        out = model(batch(0, 0)[0])
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    assert bf16.unscale_(model.parameters()) is False and bf16.scale == 1.0


def check_clip(groups):
    """Two-layer MLP per pipeline stage, column- then row-parallel over TP."""
    tp, pp = groups.tp, groups.pp
    n_in, hidden, n_out = 8, 16, 6
    torch.manual_seed(5)
    full = [torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.GELU(),
                                torch.nn.Linear(hidden, n_out)) for _ in range(pp.size)]
    data = [batch(100 + s, 0) for s in range(pp.size)]
    loss = sum(torch.nn.functional.mse_loss(m(x[:, :n_in]), y[:, :n_out])
               for m, (x, y) in zip(full, data))
    loss.backward()
    # This rank's shards of its stage's layers.
    block, (x, y) = full[pp.rank], data[pp.rank]
    h = hidden // tp.size
    rows = slice(tp.rank * h, (tp.rank + 1) * h)
    w1 = torch.nn.Parameter(block[0].weight.detach()[rows].clone())
    b1 = torch.nn.Parameter(block[0].bias.detach()[rows].clone())
    w2 = torch.nn.Parameter(block[2].weight.detach()[:, rows].clone())
    b2 = torch.nn.Parameter(block[2].bias.detach().clone())
    for t in (w1, b1, w2):
        setattr(t, TP_SHARDED_ATTR, True)
    partial = torch.nn.functional.gelu(x[:, :n_in] @ w1.T + b1) @ w2.T
    total = torch.from_numpy(tp.allreduce(partial.detach().numpy(), "sum"))
    out = partial + (total - partial.detach()) + b2
    torch.nn.functional.mse_loss(out, y[:, :n_out]).backward()
    pairs = [(w1, block[0].weight.grad[rows]), (b1, block[0].bias.grad[rows]),
             (w2, block[2].weight.grad[:, rows]), (b2, block[2].bias.grad)]
    for mine, ref in pairs:
        torch.testing.assert_close(mine.grad, ref, rtol=1e-5, atol=1e-7)
    ref_params = [t for m in full for t in m.parameters()]
    ref_norm = float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(t.grad) for t in ref_params])))
    max_norm = 0.5 * ref_norm
    norm = float(clip_grad_norm_([w1, b1, w2, b2], max_norm, tp, pp))
    torch.nn.utils.clip_grad_norm_(ref_params, max_norm)
    assert abs(norm - ref_norm) <= 1e-5 * ref_norm, (norm, ref_norm)
    ref_after = [block[0].weight.grad[rows], block[0].bias.grad[rows],
                 block[2].weight.grad[:, rows], block[2].bias.grad]
    for mine, ref in zip((w1, b1, w2, b2), ref_after):
        torch.testing.assert_close(mine.grad, ref, rtol=1e-5, atol=1e-7)
    # Under the limit nothing changes, and the norm is still the global one.
    before = [t.grad.clone() for t in (w1, b1, w2, b2)]
    norm2 = float(clip_grad_norm_([w1, b1, w2, b2], 10 * max_norm, tp, pp))
    assert abs(norm2 - max_norm) <= 1e-5 * max_norm, (norm2, max_norm)
    assert all(torch.equal(a, t.grad) for a, t in zip(before, (w1, b1, w2, b2)))


def main():
    size = MPI.COMM_WORLD.Get_size()
    clip_layouts = [(1, 2, 1), (2, 1, 1)] if size == 2 else [(1, 2, 2), (2, 2, 1)]
    hvd, comm, all_groups = init_layouts([(size, 1, 1)] + clip_layouts)
    torch.set_num_threads(1)
    ratio, gap = check_zero(all_groups[0].dp, hvd)
    check_fp16_overflow(all_groups[0].world)
    for groups in all_groups[1:]:
        check_clip(groups)
    all_groups[0].world.barrier()
    print(f"rank {comm.Get_rank()}: zero state ratio {ratio:.4f}, largest relative gap to "
          f"AdamW {gap:.2e}", flush=True)
    print(f"rank {comm.Get_rank()}: dpx zero/precision/clip checks passed", flush=True)


if __name__ == "__main__":
    main()
