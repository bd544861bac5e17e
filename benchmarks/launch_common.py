"""What the benchmarks that start ``mpirun`` of ``hvdllm train`` share."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_env() -> dict[str, str]:
    """This environment, with the repository importable, TensorFlow quiet and, as
    root, Open MPI allowed to run."""
    env = dict(os.environ)
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)})
    if os.geteuid() == 0:
        env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    return env


def mpirun() -> str:
    """The ``mpirun`` beside this Python (the virtual environment's), else the one on PATH."""
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else (shutil.which("mpirun") or "mpirun")
