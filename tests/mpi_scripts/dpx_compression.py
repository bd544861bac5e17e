"""Run under mpirun -np 2 or 4: every gradient compressor against the exact average.

Checked on the world-sized DP group and, with 4 ranks, on the two DP groups
of a dp=2 x tp=2 layout (Horovod process sets smaller than the world):

* none: the exact average; fp16/bf16: the average to 16-bit precision,
  with every value representable in the 16-bit type;
* topk, ratio 1: the exact average; small ratio, two steps: exactly the k
  largest |grad + residual| are sent, the residual holds the rest (error
  feedback), and the result is the average of every rank's sent part;
* powersgd: an averaged gradient of rank <= r comes back exactly; full-rank
  gradients over two steps match an independent float64 simulation of the
  algorithm (error feedback and warm start included);
* results are identical on every rank and the byte counts match
  hvdllm.common.compression's formulas.
"""
import numpy as np
import torch
from mpi4py import MPI

from dpx_common import gather, init_layouts, same_on_all_ranks
from hvdllm.common.compression import allreduce_bytes, topk_count, wire_bytes
from hvdllm.torch.compression import make_compressor, powersgd_initial_q

SHAPES = {"w": (64, 48), "b": (48,), "conv": (16, 4, 3), "s": (5,)}


def local_grads(group, step):
    gen = torch.Generator().manual_seed(1000 * step + group.global_rank)
    return {n: torch.randn(*s, generator=gen) for n, s in SHAPES.items()}


def exact_mean(group, grads):
    return {n: torch.from_numpy(gather(group, g).mean(0)) for n, g in grads.items()}


def reduce(comp, grads):
    out = {n: g.clone() for n, g in grads.items()}
    comp.reduce_(list(out.values()), list(out))
    for n, t in out.items():
        same_on_all_ranks(comp.group, t, f"{comp.mode} result of {n}")
    return out


def check_none_and_half(group, hvd):
    grads = local_grads(group, 0)
    want = exact_mean(group, grads)
    p = group.size
    comp = make_compressor("none", group, hvd)
    got = reduce(comp, grads)
    for n in SHAPES:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-6, atol=1e-7)
    assert comp.last_step_bytes == sum(allreduce_bytes(g.numel(), 4, p) for g in grads.values())
    for mode, dtype, eps in (("fp16", torch.float16, 2.0**-10), ("bf16", torch.bfloat16, 2.0**-7)):
        comp = make_compressor(mode, group, hvd)
        got = reduce(comp, grads)
        mean_abs = {n: torch.from_numpy(np.abs(gather(group, g)).mean(0)) for n, g in grads.items()}
        for n in SHAPES:
            err = (got[n].double() - want[n]).abs()
            bound = eps * (mean_abs[n] + want[n].abs()) + 1e-7
            assert bool((err <= bound).all()), (mode, n, float((err - bound).max()))
            assert torch.equal(got[n], got[n].to(dtype).float()), f"{mode} result not {dtype}"
        total = sum(g.numel() for g in grads.values())
        assert comp.last_step_bytes == wire_bytes(mode, (total,), p), (mode, comp.last_step_bytes)


def check_topk(group, hvd):
    p = group.size
    comp = make_compressor("topk", group, hvd, topk_ratio=1.0)
    grads = local_grads(group, 1)
    got, want = reduce(comp, grads), exact_mean(group, grads)
    for n in SHAPES:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-6, atol=1e-7)
        assert not comp.residuals[n].any()
    ratio = 0.05
    comp = make_compressor("topk", group, hvd, topk_ratio=ratio)
    residual = {n: torch.zeros(g.numel()) for n, g in grads.items()}
    for step in (2, 3):
        grads = local_grads(group, step)
        got = reduce(comp, grads)
        for n, g in grads.items():
            acc = g.reshape(-1) + residual[n]
            new_res = comp.residuals[n]
            sent = acc - new_res
            k = topk_count(g.numel(), ratio)
            kept = new_res == 0
            assert int(kept.sum()) == k, (n, int(kept.sum()), k)
            assert torch.equal(new_res[~kept], acc[~kept]), f"{n}: residual lost unsent entries"
            assert float(sent.abs()[kept].min()) >= float(acc.abs()[~kept].max()), \
                f"{n}: sent entries are not the largest"
            avg_sent = torch.from_numpy(gather(group, sent).mean(0)).view_as(g)
            torch.testing.assert_close(got[n].double(), avg_sent, rtol=1e-6, atol=1e-7)
            residual[n] = new_res.clone()
        expect = sum(wire_bytes("topk", g.shape, p, topk_ratio=ratio) for g in grads.values())
        assert comp.last_step_bytes == expect, (comp.last_step_bytes, expect)


def simulate_powersgd(all_grads, errors, qs, seed, rank):
    """float64 PowerSGD over every rank's gradient at once; updates errors and qs in place."""
    out = {}
    for n, per_rank in all_grads.items():
        shape = SHAPES[n]
        rows, cols = shape[0], int(np.prod(shape[1:]))
        r = min(rank, rows, cols)
        if len(shape) < 2 or (rows + cols) * r >= rows * cols:
            out[n] = per_rank.mean(0)
            continue
        ms = [g.reshape(rows, cols) + errors.get((n, i), 0.0) for i, g in enumerate(per_rank)]
        q = qs.get(n)
        if q is None:
            q = powersgd_initial_q(seed, n, cols, r).double().numpy()
        p_mat = np.mean([m @ q for m in ms], axis=0)
        p_hat = np.linalg.qr(p_mat)[0]
        q = np.mean([m.T @ p_hat for m in ms], axis=0)
        approx = p_hat @ q.T
        for i, m in enumerate(ms):
            errors[(n, i)] = m - approx
        qs[n] = q
        out[n] = approx.reshape(shape)
    return out


def check_powersgd(group, hvd):
    p, r = group.size, 4
    comp = make_compressor("powersgd", group, hvd, powersgd_rank=r, seed=7)
    # Rank-2 gradients sharing a column space: the average has rank 2 <= r.
    gen = torch.Generator().manual_seed(99)
    basis = torch.randn(48, 2, generator=gen)
    grads = local_grads(group, 4)
    grads["w"] = torch.randn(64, 2, generator=torch.Generator().manual_seed(group.global_rank)) \
        @ basis.T
    got, want = reduce(comp, grads), exact_mean(group, grads)
    for n in ("w", "b", "s"):  # "conv" is full-rank: compressed lossily (checked below)
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-4, atol=1e-4)
    # Full-rank gradients, two steps, against the float64 simulation.
    comp = make_compressor("powersgd", group, hvd, powersgd_rank=r, seed=7)
    errors, qs = {}, {}
    for step in (5, 6):
        grads = local_grads(group, step)
        got = reduce(comp, grads)
        all_grads = {n: gather(group, g) for n, g in grads.items()}
        want = simulate_powersgd(all_grads, errors, qs, seed=7, rank=r)
        for n in SHAPES:
            ref = torch.from_numpy(want[n])
            assert float((got[n].double() - ref).norm()) <= 1e-4 * float(ref.norm()), (step, n)
        err_w = comp.errors["w"].double().numpy()
        ref_err = errors[("w", group.rank)]
        assert np.linalg.norm(err_w - ref_err) <= 1e-4 * np.linalg.norm(ref_err), step
        expect = sum(wire_bytes("powersgd", g.shape, p, powersgd_rank=r) for g in grads.values())
        assert comp.last_step_bytes == expect, (comp.last_step_bytes, expect)
    assert comp.bytes_sent == 2 * comp.last_step_bytes


def main():
    size = MPI.COMM_WORLD.Get_size()
    layouts = [(size, 1, 1)] + ([(size // 2, 2, 1)] if size >= 4 else [])
    hvd, comm, all_groups = init_layouts(layouts)
    torch.set_num_threads(1)
    for groups in all_groups:
        dp = groups.dp
        check_none_and_half(dp, hvd)
        check_topk(dp, hvd)
        check_powersgd(dp, hvd)
    # Horovod shuts down on every rank when one exits: wait for the other DP groups.
    all_groups[0].world.barrier()
    print(f"rank {comm.Get_rank()}: dpx compression checks passed", flush=True)


if __name__ == "__main__":
    main()
