"""Tier 3: the data-parallel depth features through ``hvdllm train``.

* ZeRO-1 gives the losses of unsharded AdamW within 1e-5 relative over 20
  steps, at dp=2, dp=4 and dp=2 x tp=2;
* global gradient clipping over dp x tp x pp gives the single-process
  losses (clipping active on every step);
* every compression mode trains, sends fewer bytes than "none" and logs
  ``comm_bytes``, also with the momentum target; bf16 and fp16 mixed precision train, fp16 logging its
  loss scale.
"""
import numpy as np
import pytest

from conftest import hvdllm_cmd, mpirun_prefix, read_metrics, run_ok

pytestmark = pytest.mark.multirank
STEPS = 20
BASE = ["model.n_layer=4", "model.n_head=4", "model.d_model=64", "model.seq_len=32",
        "train.global_batch_size=8", "train.micro_batch_size=2", "train.lr=3e-3",
        f"train.steps={STEPS}", "train.weight_decay=0.1", "output.checkpoint=false"]
_cache: dict = {}


def train(tmp_path_factory, *sets: str) -> list[dict]:
    key = tuple(sorted(sets))
    if key not in _cache:
        layout = dict(item.split("=") for item in sets if item.startswith("parallel."))
        ranks = int(layout.get("parallel.dp", 1)) * int(layout.get("parallel.tp", 1)) * int(
            layout.get("parallel.pp", 1))
        out = tmp_path_factory.mktemp("run")
        args = [a for item in BASE + list(sets) + [f"output.dir={out}"] for a in ("--set", item)]
        cmd = hvdllm_cmd("train", *args)
        run_ok((mpirun_prefix(ranks) if ranks > 1 else []) + cmd, timeout=400)
        records = read_metrics(out)
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        _cache[key] = records
    return _cache[key]


def losses(records) -> np.ndarray:
    return np.array([r["loss"] for r in records])


@pytest.mark.parametrize("layout", [("parallel.dp=2",), ("parallel.dp=4",),
                                    ("parallel.dp=2", "parallel.tp=2")])
def test_zero1_matches_unsharded_adamw(layout, tmp_path_factory):
    ref = losses(train(tmp_path_factory, *layout))
    got = losses(train(tmp_path_factory, *layout, "train.zero=1"))
    assert ref[-1] < ref[0] - 0.5
    rel = np.abs(got - ref) / ref
    assert rel.max() < 1e-5, f"max relative diff {rel.max():.2e} at step {rel.argmax() + 1}"


@pytest.mark.parametrize("layout", [("parallel.dp=2", "parallel.tp=2",
                                     "parallel.sequence_parallel=true"),
                                    ("parallel.tp=2", "parallel.pp=2"),
                                    ("parallel.dp=2", "parallel.pp=2", "train.zero=1")])
def test_global_clipping_matches_single_process(layout, tmp_path_factory):
    clip = "train.grad_clip=0.5"
    ref_records = train(tmp_path_factory, clip)
    assert all(r["grad_norm"] > 0.5 for r in ref_records), "clipping never engaged"
    unclipped = losses(train(tmp_path_factory))
    ref, got = losses(ref_records), losses(train(tmp_path_factory, *layout, clip))
    assert np.abs(ref - unclipped).max() > 1e-3  # clipping changed the run
    rel = np.abs(got - ref) / ref
    assert rel.max() < 1e-4, f"max relative diff {rel.max():.2e} at step {rel.argmax() + 1}"
    norms = np.array([r["grad_norm"] for r in ref_records])
    got_norms = np.array([r["grad_norm"] for r in train(tmp_path_factory, *layout, clip)])
    assert np.abs(got_norms - norms).max() / norms.max() < 1e-3


@pytest.mark.parametrize("mode", ["fp16", "bf16", "topk", "powersgd"])
def test_compression_trains_and_sends_fewer_bytes(mode, tmp_path_factory):
    none = train(tmp_path_factory, "parallel.dp=2")
    extra = ["train.topk_ratio=0.05"] if mode == "topk" else []
    got = train(tmp_path_factory, "parallel.dp=2", f"train.compression={mode}", *extra)
    assert all(r["comm_bytes"] > 0 for r in got + none)
    assert got[-1]["comm_bytes"] < none[-1]["comm_bytes"]
    loss = losses(got)
    assert np.isfinite(loss).all() and loss[-1] < loss[0] - 0.3, loss


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["topk", "powersgd"])
def test_momentum_target_trains_and_sends_fewer_bytes(mode, tmp_path_factory):
    """1-bit-Adam-style momentum compression: dense warm-up, then compressed bytes."""
    none = train(tmp_path_factory, "parallel.dp=2")
    got = train(tmp_path_factory, "parallel.dp=2", f"train.compression={mode}",
                "train.compression_target=momentum", "train.compression_warmup_steps=5")
    assert [r["comm_bytes"] for r in got[:5]] == [r["comm_bytes"] for r in none[:5]]
    assert all(0 < r["comm_bytes"] < none[-1]["comm_bytes"] / 5 for r in got[5:])
    loss = losses(got)
    assert np.isfinite(loss).all() and loss[-1] < loss[0] - 0.3, loss


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(precision, tmp_path_factory):
    ref = losses(train(tmp_path_factory, "parallel.dp=2"))
    records = train(tmp_path_factory, "parallel.dp=2", f"train.precision={precision}")
    got = losses(records)
    assert np.isfinite(got).all() and got[-1] < got[0] - 0.5
    assert np.abs(got - ref).max() / ref.max() < 0.05  # same run, lower precision
    if precision == "fp16":
        scales = [r["loss_scale"] for r in records]
        assert all(s >= 1 for s in scales)
        assert all(r["skipped"] == (b < a) for r, a, b in
                   zip(records[1:], scales, scales[1:])), "skipped steps back off the scale"
