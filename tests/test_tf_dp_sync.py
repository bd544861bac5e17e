"""TensorFlow data-parallel gradient reductions on two ranks.

The default sum is in place on the flat gradient buffer, with the 1/dp of
the average applied in the optimizer step; ``train.reduce_op = "adasum"``
gives Horovod's Adasum, checked against its two-rank formula per tensor.
See ``mpi_scripts/tf_dp_sync_check.py``.
"""
import sys
from pathlib import Path

import pytest

from conftest import mpirun_prefix, run_ok

pytestmark = pytest.mark.multirank
SCRIPTS = Path(__file__).parent / "mpi_scripts"


def test_in_place_sum_and_adasum_on_two_ranks():
    res = run_ok(mpirun_prefix(2) + [sys.executable, str(SCRIPTS / "tf_dp_sync_check.py")],
                 timeout=240)
    assert res.stdout.count("in-place sum checks passed") == 2, res.stdout[-3000:]
    assert res.stdout.count("adasum checks passed") == 2, res.stdout[-3000:]
