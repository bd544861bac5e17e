"""The trainer for real runs: validation loss, learning-rate schedules and MFU.

* schedules: values at warm-up, mid-way and the end; "constant" is the
  old formula bit for bit; the resume warning names what changed;
* the validation split: a held-out tail that no training window touches,
  the same windows for every layout, one-line config errors;
* ``val_loss`` of one process equals that of dp=2, tp=2 and pp=2 (torch)
  and dp=2 (TensorFlow; tp=2 and pp=2 in the slow tier) within 1e-4
  relative;
* evaluating does not change training: with dropout on (so the random
  streams matter), a run that evaluates every step logs bitwise the same
  training losses as one that never does;
* resuming a run that evaluates, on a cosine schedule, is bitwise exact;
* ``mfu`` and ``tokens_per_sec_per_rank`` are logged, ``mfu`` in (0, 1].
"""
import math
import shutil

import numpy as np
import pytest

from conftest import hvdllm_cmd, mpirun_prefix, read_metrics, run_ok
from hvdllm.common.config import build_config
from hvdllm.common.data import (ShardedBatchSampler, TokenWindows, eval_micro_batches,
                                split_validation)
from hvdllm.common.errors import ConfigError, DataError
from hvdllm.train.checkpointing import schedule_changes
from hvdllm.train.loop import learning_rate
from hvdllm.train.mfu import flops_per_token, matmul_parameters

STEPS = 4
COMMON = [f"train.steps={STEPS}", "train.global_batch_size=8", "train.micro_batch_size=2",
          "train.lr=3e-3", "data.val_fraction=0.1", "train.eval_batches=2",
          "output.checkpoint=false"]
_cache: dict = {}


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _run(tmp_path_factory, framework: str, ranks: int, *extra: str) -> list[dict]:
    key = (framework, ranks, extra)
    if key not in _cache:
        out = tmp_path_factory.mktemp(f"{framework}_{ranks}")
        cmd = hvdllm_cmd("train", *_sets(f"train.framework={framework}", *COMMON, *extra,
                                         f"output.dir={out}"))
        if ranks > 1:
            cmd = mpirun_prefix(ranks) + cmd
        run_ok(cmd, timeout=300)
        _cache[key] = read_metrics(out)
    return _cache[key]


def _val_losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def _train_losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


# -- learning-rate schedules ---------------------------------------------------

def _cfg(**train) -> object:
    return build_config({"train": train})


def test_constant_schedule_is_the_old_formula_bitwise():
    for warmup in (0, 3, 7):
        cfg = _cfg(lr=3e-3, warmup_steps=warmup, steps=20)
        for step in range(1, 21):
            old = 3e-3 * step / warmup if warmup and step <= warmup else 3e-3
            assert learning_rate(step, cfg) == old  # bitwise, not approximately


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decaying_schedules(schedule):
    cfg = _cfg(lr=1e-3, min_lr=1e-4, warmup_steps=10, steps=110, lr_schedule=schedule)
    assert learning_rate(5, cfg) == pytest.approx(5e-4)        # warm-up, as before
    assert learning_rate(10, cfg) == pytest.approx(1e-3)       # peak at the end of warm-up
    assert learning_rate(60, cfg) == pytest.approx(5.5e-4)     # half-way: the midpoint
    assert learning_rate(110, cfg) == pytest.approx(1e-4)      # min_lr at train.steps
    quarter = learning_rate(35, cfg)
    if schedule == "linear":
        assert quarter == pytest.approx(1e-3 - 0.25 * 9e-4)
    else:
        assert quarter == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi / 4)))
    lrs = [learning_rate(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay
    # No warm-up: step 1 is already on the decay, train.steps ends at min_lr.
    cfg = _cfg(lr=1e-3, steps=5, lr_schedule=schedule)
    assert learning_rate(5, cfg) == 0.0 and 0 < learning_rate(1, cfg) < 1e-3


def test_resume_warns_about_a_changed_schedule():
    cfg = _cfg(lr=1e-3, steps=100, lr_schedule="cosine", min_lr=1e-5)
    manifest = {"config": build_config({"train": {"lr": 1e-3, "steps": 100,
                                                  "lr_schedule": "cosine",
                                                  "min_lr": 1e-5}}).to_dict()}
    assert schedule_changes(manifest, cfg) == ""
    manifest["config"]["train"].update(lr_schedule="linear", steps=50)
    changed = schedule_changes(manifest, cfg)
    assert "train.lr_schedule 'linear' -> 'cosine'" in changed and "train.steps" in changed
    # A checkpoint from before the keys existed had the constant schedule; longer runs
    # with a constant schedule do not warn.
    old = {"config": {"train": {"lr": 1e-3, "steps": 50, "warmup_steps": 0}}}
    assert schedule_changes(old, _cfg(lr=1e-3, steps=100)) == ""
    assert "lr_schedule" in schedule_changes(old, cfg)


# -- config and data -----------------------------------------------------------

@pytest.mark.parametrize("data,train,words", [
    ({"val_fraction": 1.0}, {}, "data.val_fraction must be in [0, 1)"),
    ({"val_fraction": -0.1}, {}, "data.val_fraction must be in [0, 1)"),
    ({"val_fraction": 0.1, "val_path": "v.txt"}, {}, "not both"),
    ({}, {"eval_every": 5}, "needs a validation set"),
    ({"val_fraction": 0.1}, {"eval_every": -1}, "train.eval_every must be >= 0"),
    ({"val_fraction": 0.1}, {"eval_batches": 0}, "train.eval_batches"),
    ({}, {"lr_schedule": "cosin"}, "did you mean 'cosine'"),
    ({}, {"lr": 1e-3, "min_lr": 2e-3}, "train.min_lr must be in [0, train.lr"),
    ({}, {"peak_flops": -1.0}, "train.peak_flops must be >= 0"),
])
def test_bad_settings_are_one_line_config_errors(data, train, words):
    with pytest.raises(ConfigError) as err:
        build_config({"data": data, "train": train})
    assert words in str(err.value) and "\n" not in str(err.value)


def test_validation_split_is_a_disjoint_tail():
    tokens = np.arange(1000) % 251
    train, val = split_validation(tokens, 0.1)
    assert len(train) == 900 and len(val) == 100
    assert np.array_equal(np.concatenate([train, val]), tokens)
    windows = TokenWindows(train, 16)
    # Every token any training window reads lies before the cut.
    last = (len(windows) - 1) * 16 + 16
    assert last < len(train)
    assert split_validation(tokens, 0.0)[1].size == 0


def test_every_layout_evaluates_the_same_windows():
    ref = eval_micro_batches(40, 8, 8, 0, 1, 3)
    assert [np.concatenate(b).tolist() for b in ref] == [list(range(b * 8, b * 8 + 8))
                                                         for b in range(3)]
    for dp, micro in ((2, 2), (4, 1), (1, 2)):
        slices = [eval_micro_batches(40, 8, micro, r, dp, 3) for r in range(dp)]
        for b in range(3):
            got = np.concatenate([np.concatenate(s[b]) for s in slices])
            assert got.tolist() == np.concatenate(ref[b]).tolist()
            assert all(len(m) == micro for s in slices for m in s[b])
    assert len(eval_micro_batches(20, 8, 2, 0, 1, 8)) == 2  # as many whole batches as fit
    with pytest.raises(DataError, match="fewer than one global batch of 8"):
        eval_micro_batches(7, 8, 2, 0, 1, 8)
    # The training sampler is untouched by evaluation: it has no shared state with it.
    sampler = ShardedBatchSampler(100, 8, 2, 0, 1, seed=3)
    first = [m.tolist() for m in sampler.next_step()]
    eval_micro_batches(40, 8, 2, 0, 1, 3)
    again = ShardedBatchSampler(100, 8, 2, 0, 1, seed=3)
    assert [m.tolist() for m in again.next_step()] == first


def test_flops_per_token_counts_matmul_parameters():
    cfg = build_config({})
    m = cfg.model
    d, ff, v, layers = m.d_model, m.ff_width, m.vocab_size, m.n_layer
    per_block = 4 * d * d + 3 * d + d + 2 * d * ff + ff + d + 4 * d  # attn, mlp, 2 norms
    want = layers * per_block + 2 * d + v * d  # final norm and the (tied) head
    assert matmul_parameters(m) == want
    assert flops_per_token(m) == 6 * want + 12 * layers * m.n_head * (d // m.n_head) * m.seq_len


# -- end to end ----------------------------------------------------------------

REFERENCE = ("train.eval_every=1",)
LAYOUTS = {  # name: (ranks, extra settings); every one evaluates at steps 2 and 4
    "dp2": (2, ("parallel.dp=2",)),
    "tp2": (2, ("parallel.tp=2",)),
    "pp2": (2, ("parallel.pp=2",)),
}


def test_torch_reference_logs_val_loss_and_mfu(tmp_path_factory):
    records = _run(tmp_path_factory, "torch", 1, *REFERENCE)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    val = _val_losses(records)
    assert sorted(val) == [1, 2, 3, 4]
    assert all(2.0 < v < 7.0 for v in val.values()), val
    for r in records:
        assert 0.0 < r["mfu"] <= 1.0, r
        assert r["tokens_per_sec_per_rank"] == pytest.approx(r["tokens_per_sec"])


@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_torch_val_loss_matches_one_process(layout, tmp_path_factory):
    ref = _val_losses(_run(tmp_path_factory, "torch", 1, *REFERENCE))
    ranks, extra = LAYOUTS[layout]
    # Logging every 3 steps: step 2's val_loss has a record of its own.
    records = _run(tmp_path_factory, "torch", ranks, *extra, "train.eval_every=2",
                   "train.log_every=3")
    assert [r for r in records if r["step"] == 2] == [{"step": 2, "val_loss": pytest.approx(
        ref[2], rel=1e-4)}]
    got = _val_losses(records)
    assert sorted(got) == [2, 4]
    for step, value in got.items():
        assert abs(value - ref[step]) / ref[step] < 1e-4, (layout, step, value, ref[step])
    assert records[-1]["tokens_per_sec_per_rank"] == pytest.approx(
        records[-1]["tokens_per_sec"] / ranks)


@pytest.mark.multirank
def test_tensorflow_val_loss_matches_one_process_and_dp2(tmp_path_factory):
    ref = _val_losses(_run(tmp_path_factory, "tensorflow", 1, "train.eval_every=2"))
    got = _val_losses(_run(tmp_path_factory, "tensorflow", 2, "parallel.dp=2",
                           "train.eval_every=2"))
    assert sorted(ref) == sorted(got) == [2, 4]
    for step in ref:
        assert abs(got[step] - ref[step]) / ref[step] < 1e-4, (step, got[step], ref[step])


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_tensorflow_val_loss_matches_one_process_slow(layout, tmp_path_factory):
    ref = _val_losses(_run(tmp_path_factory, "tensorflow", 1, "train.eval_every=2"))
    ranks, extra = LAYOUTS[layout]
    got = _val_losses(_run(tmp_path_factory, "tensorflow", ranks, *extra, "train.eval_every=2"))
    assert sorted(got) == [2, 4]
    for step in ref:
        assert abs(got[step] - ref[step]) / ref[step] < 1e-4, (layout, step, got[step], ref[step])


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_evaluation_does_not_change_training(framework, tmp_path_factory):
    # Dropout on: a random draw taken by evaluation would change every later step.
    with_eval = _run(tmp_path_factory, framework, 1, "model.dropout=0.1", "train.eval_every=1")
    without = _run(tmp_path_factory, framework, 1, "model.dropout=0.1")
    assert len(_val_losses(with_eval)) == STEPS and not _val_losses(without)
    assert _train_losses(with_eval) == _train_losses(without)  # bitwise


def test_resume_with_evaluation_and_cosine_is_bitwise_exact(tmp_path):
    out = tmp_path / "run"
    cmd = hvdllm_cmd("train", *_sets(*COMMON, "model.dropout=0.1", "train.eval_every=1",
                                     "train.lr_schedule=cosine", "train.warmup_steps=1",
                                     "train.min_lr=1e-4", "output.checkpoint=true",
                                     "output.checkpoint_every=2", f"output.dir={out}"))
    run_ok(cmd, timeout=300)
    whole = read_metrics(out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    res = run_ok(cmd, timeout=300)
    assert "resuming from" in res.stdout and "at step 2" in res.stdout
    assert "warning" not in res.stdout
    keys = ("step", "loss", "val_loss", "lr", "epoch")
    assert [[r[k] for k in keys] for r in read_metrics(out)] == \
        [[r[k] for k in keys] for r in whole]  # bitwise
    assert whole[-1]["lr"] == pytest.approx(1e-4)
