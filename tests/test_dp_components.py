"""Tier 1: data-parallel building blocks without communication.

Config checks, wire-byte formulas, the loss-scale state machine, ZeRO-1
partition arithmetic, and the single-rank maths of the compressors, ZeRO-1
AdamW, clipping and mixed precision (a DP group of one rank needs no MPI).
"""
from types import SimpleNamespace

import pytest
import torch

from hvdllm.common.compression import (COMPRESSIONS, allgather_bytes, allreduce_bytes,
                                       check_compression, half_wire_bytes, powersgd_compresses,
                                       topk_count, wire_bytes)
from hvdllm.common.errors import ConfigError, EnvironmentSetupError
from hvdllm.common.loss_scale import DynamicLossScale, check_precision
from hvdllm.common.zero import build_flat_layout, check_zero, check_zero_optimizer

SOLO = SimpleNamespace(kind="dp", size=1, rank=0, process_set=None)


# -- config checks -------------------------------------------------------------------------
def test_check_compression_accepts_valid_settings():
    for name in COMPRESSIONS:
        check_compression(name, 0.01, 4)
    check_compression("topk", 1.0, 1)
    check_compression("topk", 1, 1)


@pytest.mark.parametrize("name,match", [("tpok", "did you mean 'topk'"),
                                        ("powersdg", "did you mean 'powersgd'"),
                                        ("zip", "none, fp16, bf16, topk, powersgd$")])
def test_unknown_compression_names_valid_ones_and_nearest(name, match):
    with pytest.raises(ConfigError, match=match):
        check_compression(name)


@pytest.mark.parametrize("ratio", [0, 0.0, -0.5, 1.5, True, "0.1"])
def test_topk_ratio_outside_unit_interval(ratio):
    with pytest.raises(ConfigError, match=r"train.topk_ratio must be a number in \(0, 1\]"):
        check_compression("topk", topk_ratio=ratio)


@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_powersgd_rank_below_one(rank):
    with pytest.raises(ConfigError, match="train.powersgd_rank must be an integer >= 1"):
        check_compression("powersgd", powersgd_rank=rank)


def test_zero_and_precision_checks():
    check_zero(0, "topk", "sgd")  # off: nothing to check
    check_zero(1, "none", "AdamW")
    with pytest.raises(ConfigError, match="train.zero must be 0"):
        check_zero(2)
    with pytest.raises(ConfigError, match="cannot be combined with train.compression = 'topk'"):
        check_zero(1, "topk")
    with pytest.raises(ConfigError, match="not 'sgd'"):
        check_zero_optimizer("sgd")
    for name in ("fp32", "bf16", "fp16"):
        check_precision(name)
    with pytest.raises(ConfigError, match="fp32, bf16, fp16"):
        check_precision("fp8")


# -- wire bytes ----------------------------------------------------------------------------
def test_byte_formulas():
    assert topk_count(1000, 0.01) == 10 and topk_count(50, 0.01) == 1 and topk_count(7, 1.0) == 7
    assert allreduce_bytes(1000, 4, 1) == 0
    assert allreduce_bytes(1000, 4, 2) == 4000 and allreduce_bytes(1000, 4, 4) == 6000
    assert allgather_bytes(10, 8, 4) == 240
    assert half_wire_bytes(1000, 4) == 2 * 3 * 250 * 2
    assert half_wire_bytes(1001, 4) == 2 * 3 * 251 * 2  # padded to a multiple of 4
    for world in (2, 4, 8):
        shape = (256, 128)
        n = 256 * 128
        dense = wire_bytes("none", shape, world)
        assert dense == allreduce_bytes(n, 4, world)
        assert wire_bytes("fp16", shape, world) == wire_bytes("bf16", shape, world) == dense // 2
        k = topk_count(n, 0.01)
        assert wire_bytes("topk", shape, world, topk_ratio=0.01) == (world - 1) * k * 8
        p_q = allreduce_bytes(256 * 4, 4, world) + allreduce_bytes(128 * 4, 4, world)
        assert wire_bytes("powersgd", shape, world, powersgd_rank=4) == p_q
        assert wire_bytes(m := "powersgd", (128,), world) == wire_bytes("none", (128,), world), m
    assert all(wire_bytes(m, (64, 64), 1) == 0 for m in COMPRESSIONS)
    with pytest.raises(ConfigError):
        wire_bytes("gzip", (4,), 2)


def test_powersgd_compresses_only_when_factors_are_smaller():
    assert powersgd_compresses((64, 48), 4)
    assert powersgd_compresses((16, 4, 3), 4)  # viewed as 16 x 12
    assert not powersgd_compresses((48,), 1)
    assert not powersgd_compresses((8, 8), 4)  # (8 + 8) * 4 == 64: no saving
    assert not powersgd_compresses((64, 2), 4)  # rank capped at 2: (64 + 2) * 2 > 128


# -- loss scale ----------------------------------------------------------------------------
def test_loss_scale_grows_backs_off_and_clamps():
    ls = DynamicLossScale(init_scale=8.0, growth_interval=2, min_scale=2.0, max_scale=16.0)
    flags = [False, False, False, True, True, True, False, False, False, False, False, False]
    scales, applied = [], []
    for flag in flags:
        applied.append(ls.update(flag))
        scales.append(ls.scale)
    assert applied == [not f for f in flags]
    assert scales == [8, 16, 16, 8, 4, 2, 2, 4, 4, 8, 8, 16]
    assert ls.skipped_steps == 3
    ls2 = DynamicLossScale()
    ls2.load_state_dict(ls.state_dict())
    assert ls2.state_dict() == ls.state_dict()
    ls.update(False)
    ls.update(False)
    assert ls.scale == 16.0  # max_scale
    assert DynamicLossScale().scale == 2.0**16 and DynamicLossScale().growth_interval == 2000


@pytest.mark.parametrize("kwargs", [{"growth_factor": 1.0}, {"backoff_factor": 1.0},
                                    {"growth_interval": 0}, {"min_scale": 0.0},
                                    {"init_scale": 2.0**30}])
def test_loss_scale_rejects_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        DynamicLossScale(**kwargs)


# -- ZeRO partition ------------------------------------------------------------------------
@pytest.mark.parametrize("numels,dp", [([10, 3, 7], 4), ([5], 2), ([6, 6], 3), ([1, 0, 9, 4], 8),
                                       ([100, 1, 33], 1)])
def test_flat_layout_partitions_every_element_once(numels, dp):
    layout = build_flat_layout(numels, dp)
    total = sum(numels)
    assert layout.total == total and layout.padded % dp == 0
    assert total <= layout.padded < total + dp
    ranges = [layout.shard_range(r) for r in range(dp)]
    assert ranges[0][0] == 0 and ranges[-1][1] == layout.padded
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(end - start == layout.shard_size for start, end in ranges)
    owner = {}
    for r in range(dp):
        for s in layout.shard_slices(r):
            assert 0 <= s.shard_start and s.shard_start + s.numel <= layout.shard_size
            for i in range(s.param_start, s.param_end):
                flat = layout.offsets[s.index] + i
                assert flat == ranges[r][0] + s.shard_start + (i - s.param_start)
                assert (s.index, i) not in owner
                owner[(s.index, i)] = r
    assert set(owner) == {(j, i) for j, n in enumerate(numels) for i in range(n)}


def test_flat_layout_local_range():
    layout = build_flat_layout([10, 3, 7], 4)  # 20 elements, shards of 5
    assert layout.local_range(10, 13, 2) == (0, 3)
    assert layout.local_range(3, 12, 1) == (0, 5)
    assert layout.local_range(0, 4, 3) == (0, 0)
    with pytest.raises(ValueError):
        layout.shard_range(4)
    with pytest.raises(ValueError):
        build_flat_layout([3], 0)


# -- compressors on one rank ---------------------------------------------------------------
def test_topk_error_feedback_conserves_the_gradient():
    from hvdllm.torch.compression import make_compressor

    comp = make_compressor("topk", SOLO, None, topk_ratio=0.1)
    gen = torch.Generator().manual_seed(0)
    residual = torch.zeros(200)
    total_in, total_out = torch.zeros(200), torch.zeros(200)
    for _ in range(5):
        g = torch.randn(20, 10, generator=gen)
        out = g.clone()
        comp.reduce_([out], ["w"])
        assert int((out != 0).sum()) == 20
        new_res = comp.residuals["w"]
        assert torch.equal(out.reshape(-1) + new_res, g.reshape(-1) + residual)
        residual = new_res.clone()
        total_in += g.reshape(-1)
        total_out += out.reshape(-1)
    # Nothing is lost, only delayed: sent so far + what is still held = all gradients.
    torch.testing.assert_close(total_out + residual, total_in)
    assert comp.last_step_bytes == 0  # one rank sends nothing


def test_single_rank_compressors():
    from hvdllm.torch.compression import make_compressor

    gen = torch.Generator().manual_seed(1)
    g = torch.randn(30, 20, generator=gen)
    out = g.clone()
    make_compressor("topk", SOLO, None, topk_ratio=1.0).reduce_([out], ["w"])
    assert torch.equal(out, g)
    for mode, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        out = g.clone()
        make_compressor(mode, SOLO, None).reduce_([out], ["w"])
        assert torch.equal(out, g.to(dtype).float())
    low_rank = torch.randn(30, 3, generator=gen) @ torch.randn(3, 20, generator=gen)
    comp = make_compressor("powersgd", SOLO, None, powersgd_rank=3)
    out, bias = low_rank.clone(), torch.randn(20, generator=gen)
    bias_in = bias.clone()
    comp.reduce_([out, bias], ["w", "b"])
    torch.testing.assert_close(out, low_rank, rtol=1e-4, atol=1e-4)
    assert torch.equal(bias, bias_in)
    # Full-rank next step: the result has rank <= 3 and the rest stays behind as error.
    err_before = comp.errors["w"].clone()
    full = torch.randn(30, 20, generator=gen)
    out = full.clone()
    comp.reduce_([out, bias], ["w", "b"])
    assert int(torch.linalg.matrix_rank(out)) <= 3
    torch.testing.assert_close(comp.errors["w"] + out, full + err_before, rtol=1e-5, atol=1e-5)
    assert float(comp.errors["w"].norm()) > 0.1 * float(full.norm())


def test_reduce_grads_fills_missing_gradients_and_checks_names():
    from hvdllm.torch.compression import make_compressor

    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.ones(2, 3)
    comp = make_compressor("none", SOLO, None)
    comp.reduce_grads_(model.named_parameters())
    assert torch.equal(model.bias.grad, torch.zeros(2))
    assert torch.equal(model.weight.grad, torch.ones(2, 3))
    with pytest.raises(ValueError, match="unique name"):
        comp.reduce_([torch.ones(1), torch.ones(1)], ["a", "a"])


def test_horovod_capability_check_names_what_is_missing():
    from hvdllm.torch.compression import horovod_supports, make_compressor, require_horovod_support

    lib = SimpleNamespace(horovod_torch_allreduce_async_torch_FloatTensor=1,
                          horovod_torch_alltoall_async_torch_ShortTensor=1,
                          horovod_torch_allgather_async_torch_cuda_ShortTensor=1)
    fake = SimpleNamespace(mpi_ops=SimpleNamespace(mpi_lib=lib))
    assert horovod_supports(fake, "allreduce", torch.float32)
    assert not horovod_supports(fake, "allreduce", torch.float16)
    assert horovod_supports(fake, "allgather", torch.int16, "cuda")
    assert not horovod_supports(fake, "allgather", torch.int16, "cpu")
    pair = SimpleNamespace(kind="dp", size=2, rank=0, process_set=None)
    with pytest.raises(EnvironmentSetupError,
                       match=r"train.compression = 'bf16' needs Horovod allgather of int16 "
                             r"tensors on cpu"):
        make_compressor("bf16", pair, fake)
    with pytest.raises(EnvironmentSetupError, match="Horovod allreduce of float16"):
        require_horovod_support(fake, [("allreduce", torch.float16)], "cpu", "Compression.fp16")


# -- ZeRO-1, clipping and precision on one rank --------------------------------------------
def _mlp_and_groups(seed, wd=0.1):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return model, [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


@pytest.mark.parametrize("opt_cls", [torch.optim.AdamW, torch.optim.Adam])
def test_zero_adamw_on_one_rank_matches_torch(opt_cls):
    from hvdllm.torch.zero import zero_optimizer_from

    ref, ref_groups = _mlp_and_groups(0)
    model, groups = _mlp_and_groups(0)
    ref_opt = opt_cls(ref_groups, lr=1e-2, betas=(0.9, 0.95))
    opt = zero_optimizer_from(opt_cls(groups, lr=1e-2, betas=(0.9, 0.95)), SOLO, None)
    gen = torch.Generator().manual_seed(3)
    for step in range(20):
        x = torch.randn(4, 5, generator=gen)
        for m, o in ((ref, ref_opt), (model, opt)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
        assert abs(opt.clip_grad_norm_(0.1) - float(
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1))) < 1e-6
        ref_opt.step()
        opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    numel = sum(p.numel() for p in model.parameters())
    assert opt.state_bytes() == 3 * 4 * numel
    # A checkpointed shard restores exactly.
    state = opt.state_dict()
    model2, groups2 = _mlp_and_groups(1)
    opt2 = zero_optimizer_from(opt_cls(groups2, lr=1.0), SOLO, None)
    opt2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == 1e-2
    for a, b in zip(model2.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_zero_rejects_other_optimizers():
    from hvdllm.torch.zero import zero_optimizer_from

    model, groups = _mlp_and_groups(0)
    with pytest.raises(ConfigError, match="AdamW and torch.optim.Adam only, not SGD"):
        zero_optimizer_from(torch.optim.SGD(groups, lr=0.1), SOLO, None)
    with pytest.raises(ConfigError, match=r"amsgrad=True"):
        zero_optimizer_from(torch.optim.AdamW(model.parameters(), amsgrad=True), SOLO, None)
    opt = zero_optimizer_from(torch.optim.AdamW(model.parameters()), SOLO, None)
    bad = dict(opt.state_dict(), dp=2)
    with pytest.raises(ConfigError, match="saved for"):
        opt.load_state_dict(bad)


def test_clip_without_groups_equals_torch():
    from hvdllm.torch.clip import clip_grad_norm_

    for max_norm in (0.05, 100.0):
        a, _ = _mlp_and_groups(0)
        b, _ = _mlp_and_groups(0)
        x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
        for m in (a, b):
            m(x).pow(2).sum().backward()
        got = clip_grad_norm_(a.parameters(), max_norm)
        want = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
        torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=0)
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)


def test_mixed_precision_on_one_rank():
    from hvdllm.torch.precision import MixedPrecision, check_fp16_supported

    check_fp16_supported("cpu")  # torch 2.13 trains in fp16 autocast on CPU
    model, _ = _mlp_and_groups(0)
    mp = MixedPrecision("fp16", None)
    with mp.autocast():
        out = model(torch.ones(2, 5))
    assert out.dtype == torch.float16
    mp.scale_loss(out.float().mean()).backward()
    scaled = [p.grad.clone() for p in model.parameters()]
    assert mp.unscale_(model.parameters()) is False
    for g, p in zip(scaled, model.parameters()):
        torch.testing.assert_close(p.grad, g / 2.0**16)
    model[0].bias.grad[0] = float("nan")
    assert mp.unscale_(model.parameters()) is True
    assert mp.update(True) is False and mp.scale == 2.0**15
    for precision in ("fp32", "bf16"):
        plain = MixedPrecision(precision, None)
        assert plain.scale == 1.0 and plain.unscale_(model.parameters()) is False
        assert plain.update(True) is True
    with pytest.raises(ConfigError):
        MixedPrecision("fp8", None)


def test_compression_warmup():
    """topk sends 25% shrinking to its ratio; powersgd averages uncompressed at first."""
    from hvdllm.torch.compression import make_compressor

    gen = torch.Generator().manual_seed(2)
    comp = make_compressor("topk", SOLO, None, topk_ratio=0.01, warmup_steps=4)
    sent = []
    for _ in range(6):
        out = torch.randn(100, 100, generator=gen)
        comp.reduce_([out], ["w"])
        sent.append(int((out != 0).sum()))
    assert sent[0] == 2500 and sent[4] == sent[5] == 100
    assert all(a > b for a, b in zip(sent[:5], sent[1:5]))
    comp = make_compressor("powersgd", SOLO, None, powersgd_rank=2, warmup_steps=2)
    for step in range(3):
        g = torch.randn(30, 20, generator=gen)
        out = g.clone()
        comp.reduce_([out], ["w"])
        if step < 2:
            assert torch.equal(out, g) and "w" not in comp.errors
        else:
            assert int(torch.linalg.matrix_rank(out)) <= 2 and "w" in comp.errors


def _momentum_setup(mode, warmup, **kw):
    from hvdllm.torch.compression import make_compressor

    torch.manual_seed(5)
    model = torch.nn.Linear(16, 12)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    comp = make_compressor(mode, SOLO, None, warmup_steps=warmup, target="momentum", **kw)
    return model, opt, comp


def _momentum_step(model, opt, comp, gen):
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    named = list(model.named_parameters())
    comp.reduce_grads_(named)
    if comp.takes_step:
        comp.step_(opt, named)
    else:
        opt.step()


def test_momentum_compression_freezes_v_and_follows_adamw():
    """Warm-up: plain AdamW.  Then v is frozen and, with nothing dropped, the step is AdamW's."""
    model, opt, comp = _momentum_setup("topk", 2, topk_ratio=1.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        _momentum_step(model, opt, comp, gen)
    assert not comp.takes_step and comp.steps == 2
    w = model.weight
    before = {k: v.clone() for k, v in opt.state[w].items()}
    w0 = w.detach().clone()
    _momentum_step(model, opt, comp, gen)
    assert comp.takes_step
    st = opt.state[w]
    assert torch.equal(st["exp_avg_sq"], before["exp_avg_sq"])  # frozen
    m = 0.9 * before["exp_avg"] + 0.1 * w.grad
    torch.testing.assert_close(st["exp_avg"], m)
    step = float(before["step"]) + 1
    denom = (before["exp_avg_sq"] / (1 - 0.95 ** step)).sqrt() + 1e-8
    expect = w0 * (1 - 1e-2 * 0.1) - 1e-2 / (1 - 0.9 ** step) * m / denom
    torch.testing.assert_close(w.detach(), expect)
    assert float(st["step"]) == step


def test_momentum_topk_error_feedback_conserves_and_masks():
    """Top-k of m / denom: sent + residual == local scaled momentum; unsent entries stay put."""
    model, opt, comp = _momentum_setup("topk", 1, topk_ratio=0.1)
    gen = torch.Generator().manual_seed(3)
    _momentum_step(model, opt, comp, gen)
    for _ in range(3):
        w = model.weight
        st = opt.state[w]
        m_old, w_old = st["exp_avg"].clone(), w.detach().clone()
        res_old = comp.inner.residuals.get("weight", torch.zeros(w.numel())).clone()
        _momentum_step(model, opt, comp, gen)
        denom = (st["exp_avg_sq"] / (1 - 0.95 ** float(st["step"]))).sqrt() + 1e-8
        local = (0.9 * m_old + 0.1 * w.grad) / denom
        sent = st["exp_avg"] / denom
        assert int((sent != 0).sum()) == topk_count(w.numel(), 0.1)
        torch.testing.assert_close(sent.reshape(-1) + comp.inner.residuals["weight"],
                                   local.reshape(-1) + res_old)
        moved = (w.detach() - w_old * (1 - 1e-3)).abs() > 1e-9
        assert torch.equal(moved, sent != 0)  # only the sent entries get an Adam update


def test_momentum_compression_state_round_trip_and_checks():
    model, opt, comp = _momentum_setup("powersgd", 1, powersgd_rank=2)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        _momentum_step(model, opt, comp, gen)
    assert comp.last_step_bytes == 0 and "weight" in comp.inner.errors
    state = comp.state_dict()
    _, _, fresh = _momentum_setup("powersgd", 1, powersgd_rank=2)
    fresh.load_state_dict(state)
    assert fresh.steps == 3 and fresh.takes_step
    assert torch.equal(fresh.inner.errors["weight"], comp.inner.errors["weight"])
    assert torch.equal(fresh.inner.qs["weight"], comp.inner.qs["weight"])
    from hvdllm.common.compression import check_compression_target

    check_compression_target("momentum", "topk", "adamw", "torch")
    for args, match in [(("moment", "topk"), "must be one of gradient, momentum"),
                        (("momentum", "none"), "other than \"none\""),
                        (("momentum", "topk", "sgd"), "needs train.optimizer"),
                        (("momentum", "topk", "adamw", "tensorflow"), "torch\" only")]:
        with pytest.raises(ConfigError, match=match):
            check_compression_target(*args)
