"""Tier 2: gradient compressors, ZeRO-1, fp16 loss-scale agreement and clipping, multi-rank."""
import re
import sys
from pathlib import Path

import pytest

from conftest import mpirun_prefix, run_ok

pytestmark = pytest.mark.multirank
SCRIPTS = Path(__file__).parent / "mpi_scripts"


@pytest.mark.parametrize("np_", [2, 4])
def test_compressors_against_exact_average(np_):
    res = run_ok(mpirun_prefix(np_) + [sys.executable, str(SCRIPTS / "dpx_compression.py")],
                 timeout=180)
    assert res.stdout.count("dpx compression checks passed") == np_


@pytest.mark.parametrize("np_", [2, 4])
def test_zero1_fp16_overflow_agreement_and_clipping(np_):
    res = run_ok(mpirun_prefix(np_) + [sys.executable, str(SCRIPTS / "dpx_zero_precision_clip.py")],
                 timeout=180)
    assert res.stdout.count("dpx zero/precision/clip checks passed") == np_
    ratios = [float(r) for r in re.findall(r"zero state ratio ([0-9.]+)", res.stdout)]
    assert len(ratios) == np_ and all(abs(r - 1 / np_) < 0.01 for r in ratios), ratios
