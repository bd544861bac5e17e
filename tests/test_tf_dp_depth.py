"""TensorFlow data-parallel depth: compression, ZeRO-1, precision, clipping, SGD.

Single process: each TensorFlow compressor gives its torch counterpart's
result on the same gradients (a DP group of one rank runs the same
arithmetic); the torch-style SGD matches ``torch.optim.SGD``; ZeRO-1 on one
rank matches Keras AdamW; clipping matches ``tf.clip_by_global_norm``; the
precision policies and loss-scale agreement.  Two ranks
(``mpi_scripts/tf_dpx_check.py``): every compressor against a numpy
simulation of the common algorithm, ZeRO-1 against unsharded AdamW over 20
steps, fp16 overflow skipped by every rank when one overflows, clipping over
tp, pp and dp, and a Keras GPT training under the bf16 and fp16 policies.
"""
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import mpirun_prefix, run_ok
from hvdllm.common.config import build_config
from hvdllm.common.errors import ConfigError

SCRIPTS = Path(__file__).parent / "mpi_scripts"
SOLO = SimpleNamespace(kind="dp", size=1, rank=0, ranks=(0,), process_set=None)
SOLO_GROUPS = SimpleNamespace(dp=SOLO, tp=SOLO, pp=SOLO, world=SOLO)
SHAPES = ((7, 5), (5,), (5, 3), (3,), (1,))


def _arrays(seed, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _variables(seed=0):
    import keras

    return [keras.Variable(a) for a in _arrays(seed)]


@pytest.mark.parametrize("mode", ["none", "fp16", "bf16", "topk", "powersgd"])
def test_compressors_match_torch_on_one_rank(mode):
    import tensorflow as tf
    import torch

    from hvdllm.common.compression import matrix_shape, powersgd_compresses, powersgd_effective_rank
    from hvdllm.tensorflow.compression import make_compressor, powersgd_initial_q
    from hvdllm.torch.compression import make_compressor as make_torch_compressor

    kw = {"topk": dict(topk_ratio=0.1, warmup_steps=2),
          "powersgd": dict(powersgd_rank=2, seed=3, warmup_steps=1)}.get(mode, {})
    shapes = {"w": (40, 24), "b": (24,), "conv": (8, 3, 5)}
    ours, theirs = make_compressor(mode, SOLO, None, **kw), make_torch_compressor(mode, SOLO, None,
                                                                               **kw)
    if mode == "powersgd":  # the two frameworks draw the first Q differently: start alike
        for n, s in shapes.items():
            if powersgd_compresses(s, 2):
                q = powersgd_initial_q(3, n, matrix_shape(s)[1], powersgd_effective_rank(s, 2))
                theirs.qs[n] = torch.from_numpy(q.numpy())
    for step in range(4):
        grads = dict(zip(shapes, _arrays(step, shapes.values())))
        got = ours.reduce([tf.constant(g) for g in grads.values()], list(grads))
        want = [torch.from_numpy(g.copy()) for g in grads.values()]
        theirs.reduce_(want, list(grads))
        for n, a, b in zip(shapes, got, want):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5,
                                       err_msg=f"{mode} step {step} {n}")
            if mode in ("none", "fp16", "bf16", "topk"):
                assert np.array_equal(a.numpy(), b.numpy()), f"{mode} is not exact for {n}"
    assert ours.steps == theirs.steps
    state = ours.state_dict()
    torch_state = theirs.state_dict()
    assert set(state) == set(torch_state)
    again = make_compressor(mode, SOLO, None, **kw)
    again.load_state_dict(state)
    assert again.state_dict().keys() == state.keys()
    with pytest.raises(ValueError, match="unique name"):
        ours.reduce([tf.ones([1]), tf.ones([1])], ["a", "a"])


def test_torch_sgd_matches_torch_optim_sgd():
    import tensorflow as tf
    import torch

    from hvdllm.tensorflow.update import build_optimizer

    cfg = build_config({}, ["train.optimizer=sgd", "train.momentum=0.9",
                            "train.weight_decay=0.1", "train.lr=0.05"])
    variables = _variables()
    opt = build_optimizer(variables, cfg)
    assert sum(v.path.endswith("_momentum") for v in opt.variables) == len(variables)
    params = [torch.nn.Parameter(torch.from_numpy(a)) for a in _arrays(0)]
    ref = torch.optim.SGD([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                           {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                          lr=0.05, momentum=0.9)

    @tf.function
    def step(grads, lr):
        opt.learning_rate.assign(lr)
        opt.apply(grads, variables)

    for i in range(10):
        lr = 0.05 * (i + 1) / 10  # a changing rate: Keras's own SGD would differ here
        grads = _arrays(100 + i)
        step([tf.constant(g) for g in grads], tf.constant(lr))
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g)
        for group in ref.param_groups:
            group["lr"] = lr
        ref.step()
    for v, p in zip(variables, params):
        np.testing.assert_allclose(v.numpy(), p.detach().numpy(), rtol=1e-6, atol=1e-6)


def test_zero_on_one_rank_matches_keras_adamw():
    import tensorflow as tf

    from hvdllm.tensorflow.update import GradientUpdate, build_optimizer
    from hvdllm.tensorflow.zero import zero_optimizer_from

    cfg = build_config({}, ["train.weight_decay=0.1", "train.lr=0.01", "train.grad_clip=1.0"])
    zcfg = build_config({}, ["train.weight_decay=0.1", "train.lr=0.01", "train.grad_clip=1.0",
                             "train.zero=1"])
    ref_vars, zero_vars = _variables(), _variables()
    ref = GradientUpdate(ref_vars, build_optimizer(ref_vars, cfg), cfg, SOLO_GROUPS, None)
    zero = GradientUpdate(zero_vars, build_optimizer(zero_vars, zcfg), zcfg, SOLO_GROUPS, None)
    for step in range(20):
        grads = [tf.constant(g) for g in _arrays(200 + step)]
        lr = 0.01 * (step + 1) / 20
        want, got = ref.apply(ref.reduce(grads), lr), zero.apply(zero.reduce(grads), lr)
        assert got.as_metrics() == pytest.approx(want.as_metrics(), rel=1e-6)
        for a, b in zip(zero_vars, ref_vars):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert zero.optimizer.steps == 20
    # Only Keras Adam/AdamW, and only before their first step.
    with pytest.raises(ConfigError, match="TorchSGD"):
        zero_optimizer_from(build_optimizer(_variables(), build_config(
            {}, ["train.optimizer=sgd"])), ref_vars, SOLO, None)
    with pytest.raises(ConfigError, match="before its first step"):
        zero_optimizer_from(ref.optimizer, ref_vars, SOLO, None)


def test_clipping_and_fp16_on_one_rank():
    import tensorflow as tf

    from hvdllm.tensorflow.clip import clip_by_global_norm, global_grad_norm
    from hvdllm.tensorflow.update import GradientUpdate, build_optimizer

    variables = _variables()
    grads = [tf.constant(g) for g in _arrays(5)]
    want, want_norm = tf.clip_by_global_norm(grads, 0.5)
    got, norm = clip_by_global_norm(grads, variables, 0.5)
    assert norm == pytest.approx(float(want_norm), rel=1e-6)
    assert norm == pytest.approx(global_grad_norm(grads, variables), rel=1e-12)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    # fp16 through GradientUpdate: unscaled, clipped and applied like plain SGD on grads/scale.
    cfg = build_config({}, ["train.optimizer=sgd", "train.momentum=0", "train.lr=1.0",
                            "train.precision=fp16", "train.grad_clip=0.5"])
    update = GradientUpdate(variables, build_optimizer(variables, cfg), cfg, SOLO_GROUPS, None)
    before = [v.numpy().copy() for v in variables]
    scale = update.loss_scale
    assert scale == 2.0**16
    info = update.apply(update.reduce([g * scale for g in grads]), 1.0)
    assert info.as_metrics() == {"comm_bytes": 0, "grad_norm": pytest.approx(norm, rel=1e-6),
                                 "loss_scale": scale, "skipped": False}
    for v, b, g in zip(variables, before, want):
        np.testing.assert_allclose(v.numpy(), b - g.numpy(), rtol=1e-6, atol=1e-7)
    bad = [g * scale for g in grads]
    bad[1] = tf.fill(bad[1].shape, float("nan"))
    after = [v.numpy().copy() for v in variables]
    info = update.apply(update.reduce(bad), 1.0)
    assert info.as_metrics() == {"comm_bytes": 0, "loss_scale": scale / 2, "skipped": True}
    assert all(np.array_equal(v.numpy(), a) for v, a in zip(variables, after))


def test_precision_policy_and_float32_loss():
    import tensorflow as tf

    from hvdllm.tensorflow.precision import MixedPrecision, float32_criterion, precision_policy

    policies = {p: precision_policy(build_config({}, [f"train.precision={p}"]))
                for p in ("fp32", "bf16", "fp16")}
    assert policies == {"fp32": None, "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
    seen = []

    class Criterion:
        def __call__(self, logits, targets):
            seen.append(logits.dtype)
            return tf.reduce_mean(logits)

        def full_logits(self, logits):
            return logits[..., :3]

    crit = float32_criterion(Criterion())
    assert float32_criterion(crit) is crit
    assert crit(tf.ones([2, 4], tf.bfloat16), None).dtype == tf.float32 and seen == [tf.float32]
    assert crit.full_logits(tf.ones([2, 4])).shape == (2, 3)
    mp = MixedPrecision("fp16", None)
    assert mp.found_inf(True) and not mp.found_inf(False)
    assert mp.update(True) is False and mp.scale == 2.0**15
    for precision in ("fp32", "bf16"):
        plain = MixedPrecision(precision, None)
        assert plain.scale == 1.0 and plain.found_inf(True) is False and plain.update(True)
    with pytest.raises(ConfigError):
        precision_policy("fp8")


@pytest.mark.multirank
def test_dp_depth_on_two_ranks():
    res = run_ok(mpirun_prefix(2) + [sys.executable, str(SCRIPTS / "tf_dpx_check.py")],
                 timeout=240)
    assert res.stdout.count("tensorflow dp depth checks passed") == 2, res.stdout[-3000:]
    for what in ("compression", "zero", "fp16 overflow", "clipping"):
        assert res.stdout.count(f"{what} checks passed") >= 2, what


@pytest.mark.multirank
def test_training_metrics_carry_the_torch_fields(tmp_path):
    """``hvdllm train`` in TensorFlow logs what torch logs, with the same bytes on the wire.

    dp=2, fp16 with clipping and PowerSGD: comm_bytes (the same algorithm moves
    the same bytes in both frameworks), grad_norm (on applied steps),
    loss_scale and skipped.
    """
    from conftest import hvdllm_cmd, read_metrics

    records = {}
    for fw in ("torch", "tensorflow"):
        out = tmp_path / fw
        sets = [f"train.framework={fw}", "parallel.dp=2",
                "train.precision=fp16", "train.grad_clip=1.0", "train.compression=powersgd",
                "train.powersgd_rank=2", "model.n_layer=2", "model.d_model=32", "train.steps=6",
                "model.seq_len=16", "train.global_batch_size=4", "output.checkpoint=false",
                f"output.dir={out}"]
        run_ok(mpirun_prefix(2) + hvdllm_cmd("train", *[a for s in sets for a in ("--set", s)]),
               timeout=300)
        records[fw] = read_metrics(out)
    assert len(records["torch"]) == len(records["tensorflow"]) == 6
    for want, got in zip(records["torch"], records["tensorflow"]):
        # A skipped step has no norm; fp16 in Keras may overflow where torch's
        # autocast does not (the scaler then halves the scale, as it should).
        assert set(want) - {"grad_norm"} == set(got) - {"grad_norm"}, (sorted(want), sorted(got))
        for rec in (want, got):
            assert isinstance(rec["skipped"], bool) and rec["loss_scale"] > 0
            assert ("grad_norm" in rec) == (not rec["skipped"]), rec
        assert got["comm_bytes"] == want["comm_bytes"] > 0
    assert any(not r["skipped"] for r in records["tensorflow"]), records["tensorflow"]
