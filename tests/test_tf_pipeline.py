"""TensorFlow pipeline parallelism: the executor against one process, and a failing stage.

Tier 2 (``mpi_scripts/tf_pp_check.py``, every rank one stage): one step of
each schedule, with and without recompute, gives the single-process loss
and the gradient of every variable within 1e-5 for both families; dropout
masks are the single process's (recompute included); the stages hold
disjoint variables but GPT's tied embedding, whose copies stay
bit-identical through AdamW steps; logits and sampling through the pipeline
are the single process's; a stage that raises ends the whole job with its
traceback.  The default run covers each schedule and recompute setting for
both families at pp=2; the whole matrix and pp=4 are marked slow.
"""
import re
import sys
import time
from pathlib import Path

import pytest

from conftest import mpirun_prefix, run, run_ok

pytestmark = pytest.mark.multirank
SCRIPT = Path(__file__).parent / "mpi_scripts" / "tf_pp_check.py"
SCHEDULES = ("gpipe", "1f1b", "interleaved")
DEFAULT_CASES = [  # every schedule and recompute setting for both families, pp=2
    "gpt:gpipe", "gpt:1f1b:recompute", "gpt:interleaved", "gpt:1f1b:dropout:recompute",
    "llama:gpipe:recompute", "llama:1f1b", "llama:interleaved:recompute:balanced",
    "gpt:steps",
]
ALL_CASES = [f"{family}:{schedule}{recompute}" for family in ("gpt", "llama")
             for schedule in SCHEDULES for recompute in ("", ":recompute")]
SLOW_EXTRA = ["gpt:gpipe:dropout", "llama:interleaved:dropout:recompute", "gpt:1f1b:parameters",
              "llama:gpipe:balanced", "llama:steps"]


def check(np_: int, cases: list[str], timeout: float) -> None:
    res = run_ok(mpirun_prefix(np_) + [sys.executable, str(SCRIPT), *cases], timeout=timeout)
    assert res.stdout.count("tf pp checks passed") == np_, res.stdout[-3000:]


def test_tf_executor_matches_one_process():
    check(2, DEFAULT_CASES, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("np_", [2, 4])
def test_tf_executor_matches_one_process_all(np_):
    cases = [c for c in ALL_CASES + SLOW_EXTRA if np_ == 4 or c not in DEFAULT_CASES]
    check(np_, cases + ["gpt:steps"] * (np_ == 4), timeout=900)


def test_tf_failing_stage_ends_the_job():
    res = run(mpirun_prefix(2) + [sys.executable, str(SCRIPT), "fail"], timeout=180)
    ended = time.time()
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "deliberate failure in the forward of stage 1" in out, out[-3000:]
    assert "rank 1 of 2 failed" in out, out[-3000:]
    assert re.search(r"Traceback .*\n(.*\n)*.*in _forward", out), out[-3000:]  # the traceback
    raised = float(re.search(r"raising at ([0-9.]+)", out).group(1))
    assert ended - raised < 30, ended - raised  # the other stage would wait 600 s
