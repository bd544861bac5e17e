"""Pipeline parallelism: the executor against one process, failures, then whole runs.

Tier 2 (``mpi_scripts/pp_*.py``, every rank one stage):

* each schedule, with and without recompute, gives the single-process loss
  and gradients; activations are all released after a step, GPipe holds
  more of them than 1F1B, recompute fewer; GPT's tied embedding copies stay
  bit-identical; fewer micro-batches than stages runs, with one warning;
* two stages that disagree about a message's dtype or shape fail with an
  error naming both; a stage that raises ends the whole job quickly.

Tier 3: ``hvdllm train`` with the same config and seed must give the loss of
pp=1 tp=1 dp=1 within 1e-4 relative at each of 20 steps, and the same final
checkpoint.  The default run covers a representative subset; the whole
matrix (both families x three schedules x pp=2, pp=4, dp=2 x pp=2,
tp=2 x pp=2, dp=2 x tp=2 x pp=2) is marked slow.
"""
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import hvdllm_cmd, mpirun_prefix, read_metrics, run, run_ok
from hvdllm.common.checkpoint import load_checkpoint

pytestmark = pytest.mark.multirank
SCRIPTS = Path(__file__).parent / "mpi_scripts"
STEPS = 20
MODEL = {  # tiny, but every sharded size divides by 2 and the head matters
    "gpt": ["model.family=gpt", "model.n_head=4", "model.d_model=64", "model.seq_len=32"],
    "llama": ["model.family=llama", "model.n_head=8", "model.n_kv_head=4", "model.d_model=64",
              "model.d_ff=128", "model.seq_len=32"],
}
SCHEDULES = {"gpipe": ("gpipe", 1), "1f1b": ("1f1b", 1), "interleaved": ("interleaved", 2)}
LAYOUTS = {  # name: (dp, tp, pp)
    "pp2": (1, 1, 2),
    "pp4": (1, 1, 4),
    "dp2_pp2": (2, 1, 2),
    "tp2_pp2": (1, 2, 2),
    "dp2_tp2_pp2": (2, 2, 2),
}
_cache: dict = {}


def _n_layer(pp: int, virtual_stages: int) -> int:
    return max(4, pp * virtual_stages)


def train(family: str, n_layer: int, dp: int, tp: int, pp: int, schedule: str = "1f1b",
          virtual_stages: int = 1, extra: tuple[str, ...] = (), *, tmp_path_factory,
          micro_batch_size: int = 2) -> dict:
    """Run ``hvdllm train`` once per distinct setting; return its losses, checkpoint and output."""
    key = (family, dp, tp, pp, schedule, virtual_stages, extra, micro_batch_size, n_layer)
    if key not in _cache:
        out = tmp_path_factory.mktemp(f"{family}_dp{dp}_tp{tp}_pp{pp}_{schedule}")
        sets = MODEL[family] + [
            f"model.n_layer={n_layer}", f"parallel.dp={dp}", f"parallel.tp={tp}",
            f"parallel.pp={pp}", f"parallel.schedule={schedule}",
            f"parallel.virtual_stages={virtual_stages}", f"train.steps={STEPS}",
            "train.global_batch_size=8", f"train.micro_batch_size={micro_batch_size}",
            "train.lr=2e-3", "train.sample_tokens=24", f"output.dir={out}", *extra]
        cmd = hvdllm_cmd("train", *[arg for item in sets for arg in ("--set", item)])
        if dp * tp * pp > 1:
            cmd = mpirun_prefix(dp * tp * pp) + cmd
        res = run_ok(cmd, timeout=500)
        records = read_metrics(out)
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        _, weights = load_checkpoint(out)
        _cache[key] = {"losses": np.array([r["loss"] for r in records]), "weights": weights,
                       "stdout": res.stdout, "stderr": res.stderr,
                       "sample": res.stdout.partition("hvdllm: sample:\n")[2]}
    return _cache[key]


def check_against_one_process(family: str, layout: str, schedule: str, tmp_path_factory,
                              extra: tuple[str, ...] = (), micro_batch_size: int = 2) -> dict:
    dp, tp, pp = LAYOUTS[layout]
    name, v = SCHEDULES[schedule]
    n_layer = _n_layer(pp, v)
    ref = train(family, n_layer, 1, 1, 1, tmp_path_factory=tmp_path_factory)
    got = train(family, n_layer, dp, tp, pp, name, v, extra, tmp_path_factory=tmp_path_factory,
                micro_batch_size=micro_batch_size)
    assert ref["losses"][-1] < ref["losses"][0] - 0.5, ref["losses"]  # training moves
    rel = np.abs(got["losses"] - ref["losses"]) / np.abs(ref["losses"])
    assert rel.max() < 1e-4, f"{family} {layout} {schedule}: max relative diff {rel.max():.2e} " \
                             f"at step {rel.argmax() + 1}"
    # The final checkpoint, gathered from every stage (and TP shard), is the same model.
    assert sorted(got["weights"]) == sorted(ref["weights"])
    for wname, want in ref["weights"].items():
        err = np.abs(got["weights"][wname] - want).max()
        assert err < 1e-4, f"{family} {layout} {schedule}: checkpoint {wname} differs by {err:.2e}"
    # Rank 0 logs the split once.
    splits = [line for line in got["stdout"].splitlines() if "pipeline split" in line]
    assert len(splits) == 1 and f"into {pp * v} chunks" in splits[0], got["stdout"][-2000:]
    if tp == 1:  # generation through the pipeline samples what one process samples
        assert len(ref["sample"]) > 24 and got["sample"] == ref["sample"]
    return got


# -- tier 2: the executor ------------------------------------------------------

@pytest.mark.parametrize("np_,family", [(2, "gpt"), (4, "llama")])
def test_executor_matches_one_process(np_, family):
    res = run_ok(mpirun_prefix(np_) + [sys.executable, str(SCRIPTS / "pp_executor_check.py"),
                                       family], timeout=300)
    assert res.stdout.count("pp executor checks passed") == np_, res.stdout
    warnings = [line for line in res.stderr.splitlines() if "hvdllm: warning:" in line]
    m = np_ // 2
    assert len(warnings) == 1, res.stderr[-3000:]
    assert f"{m} micro-batch(es) for {np_} pipeline stages" in warnings[0]
    theory = (np_ - 1) / (m + np_ - 1)
    assert f"about {theory:.0%} of each step" in warnings[0], warnings[0]


@pytest.mark.slow
@pytest.mark.parametrize("np_,family", [(2, "llama"), (4, "gpt")])
def test_executor_matches_one_process_more(np_, family):
    test_executor_matches_one_process(np_, family)


@pytest.mark.parametrize("mode", ["dtype", "shape"])
def test_mismatched_message_names_both_stages(mode):
    res = run(mpirun_prefix(2) + [sys.executable, str(SCRIPTS / "pp_mismatch.py"), mode],
              timeout=120)
    ended = time.time()
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    if mode == "dtype":
        pattern = (r"pipeline set-up: stage (\d) \(global rank \1\) expects .* as float(32|64)"
                   r"\[2,16,32\] but stage (\d) \(global rank \3\) will send float(64|32)\[2,16,32\]")
    else:
        pattern = (r"pipeline activation of micro-batch 0 \(chunk 0 -> 1\): stage 1 \(global "
                   r"rank 1\) expected float32\[2,16,32\] but stage 0 \(global rank 0\) sent "
                   r"float32\[2,8,32\]")
    assert re.search(pattern, out), out[-3000:]
    started = float(re.search(r"starting at ([0-9.]+)", out).group(1))
    assert ended - started < 60, ended - started  # an error, not the 120 s deadline


def test_failing_stage_ends_the_job():
    res = run(mpirun_prefix(4) + [sys.executable, str(SCRIPTS / "pp_fail_stage.py")], timeout=180)
    ended = time.time()
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "ValueError: deliberate failure in the forward of stage 3" in out, out[-3000:]
    assert "deliberately_failing_block" in out  # the traceback, not just the message
    assert "rank 3 of 4 failed" in out
    raised = float(re.search(r"raising at ([0-9.]+)", out).group(1))
    assert ended - raised < 30, ended - raised  # the other stages would wait 600 s


# -- tier 3: whole runs against one process -----------------------------------

DEFAULT_RUNS = [  # (family, layout, schedule, extra config)
    ("gpt", "pp2", "1f1b", ("parallel.partition=parameters",)),
    ("llama", "pp2", "1f1b", ("parallel.partition=balanced", "parallel.recompute=full")),
    ("gpt", "pp2", "interleaved", ()),
    ("llama", "pp4", "gpipe", ()),
    ("gpt", "dp2_tp2_pp2", "1f1b", ("parallel.sequence_parallel=true",
                                    "parallel.recompute=full")),
]
SLOW_VARIANTS = [  # partition, recompute and sequence parallelism with other layouts
    ("llama", "tp2_pp2", "interleaved", ("parallel.sequence_parallel=true",
                                         "parallel.recompute=full")),
    ("gpt", "dp2_pp2", "gpipe", ("parallel.partition=balanced",)),
    ("llama", "pp4", "1f1b", ("parallel.partition=parameters", "parallel.recompute=full")),
    ("gpt", "tp2_pp2", "interleaved", ("parallel.partition=parameters",)),
]


@pytest.mark.parametrize("family,layout,schedule,extra", DEFAULT_RUNS)
def test_pipeline_training_matches_single_process(family, layout, schedule, extra,
                                                  tmp_path_factory):
    check_against_one_process(family, layout, schedule, tmp_path_factory, extra)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_training_matches_single_process_all(family, layout, schedule,
                                                      tmp_path_factory):
    check_against_one_process(family, layout, schedule, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("family,layout,schedule,extra", SLOW_VARIANTS)
def test_pipeline_variants_match_single_process(family, layout, schedule, extra,
                                                tmp_path_factory):
    check_against_one_process(family, layout, schedule, tmp_path_factory, extra)


@pytest.mark.slow
def test_fewer_micro_batches_than_stages_warns_once(tmp_path_factory):
    got = check_against_one_process("gpt", "pp4", "1f1b", tmp_path_factory,
                                    micro_batch_size=4)  # 2 micro-batches for 4 stages
    warnings = [line for line in got["stderr"].splitlines() if "hvdllm: warning:" in line]
    assert len(warnings) == 1 and "about 60% of each step is pipeline bubble" in warnings[0], \
        got["stderr"][-2000:]
