"""Tier 3, the acceptance test of data parallelism: equality with one process.

Same config, seed and global batch: the loss at each of 20 steps must match
dp=1 without accumulation within 1e-4 relative, for dp=1 with 4
accumulation steps, dp=2 and dp=4 (oversubscribed), in both frameworks.
"""
import sys

import numpy as np
import pytest

from conftest import hvdllm_cmd, mpirun_prefix, read_metrics, run_ok

pytestmark = pytest.mark.multirank
STEPS = 20
GLOBAL_BATCH = 8
LAYOUTS = {  # name: (dp, micro_batch_size)
    "dp1_noaccum": (1, 8),
    "dp1_accum4": (1, 2),
    "dp2": (2, 2),
    "dp4": (4, 2),
}
_cache: dict = {}


def train_losses(framework: str, layout: str, tmp_path_factory) -> list[float]:
    key = (framework, layout)
    if key not in _cache:
        dp, micro = LAYOUTS[layout]
        out = tmp_path_factory.mktemp(f"{framework}_{layout}")
        cmd = hvdllm_cmd("train", "--set", f"train.framework={framework}",
                         "--set", f"parallel.dp={dp}", "--set", f"train.steps={STEPS}",
                         "--set", f"train.global_batch_size={GLOBAL_BATCH}",
                         "--set", f"train.micro_batch_size={micro}",
                         "--set", "train.lr=3e-3", "--set", f"output.dir={out}")
        if dp > 1:
            cmd = mpirun_prefix(dp) + cmd
        run_ok(cmd, timeout=400)
        records = read_metrics(out)
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        _cache[key] = [r["loss"] for r in records]
    return _cache[key]


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
@pytest.mark.parametrize("layout", ["dp1_accum4", "dp2", "dp4"])
def test_loss_matches_single_process(framework, layout, tmp_path_factory):
    ref = np.array(train_losses(framework, "dp1_noaccum", tmp_path_factory))
    got = np.array(train_losses(framework, layout, tmp_path_factory))
    # Training must actually move: otherwise equality would prove little.
    assert ref[-1] < ref[0] - 0.5, ref
    rel = np.abs(got - ref) / np.abs(ref)
    assert rel.max() < 1e-4, f"{layout}: max relative diff {rel.max():.2e} at step {rel.argmax() + 1}"
