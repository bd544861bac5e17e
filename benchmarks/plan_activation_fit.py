"""Fit the planner's TensorFlow activation coefficients to its allocator.

    python benchmarks/plan_activation_fit.py [--family gpt] [--steps 2] [--pipeline]

autograd's saved tensors can be counted (torch's coefficients are checked
that way in tests/test_planner.py); a TensorFlow gradient graph's cannot, so
its coefficients come from the CPU allocator's peak
(``TF_CPU_ALLOCATOR_USE_BFC=true``, :mod:`hvdllm.common.memory_probe`).  For
each model shape, one process trains one micro-batch of 4 and of 8
sequences; the difference is four sequences' activations, free of parameters,
optimizer state and runtime.  Divided by ``seq_len * n_layer`` (less the
head's logits) it gives floats per token and layer, which are fitted by
least squares to ``a_h d + a_ff d_ff + a_hs n_head seq_len`` and set beside
the planner's prediction.

``--pipeline`` fits what a pipeline stage holds instead: two ranks, pp=2,
GPipe over 4 micro-batches of 2 and of 4 sequences; stage 0 (rank 0) holds
all four micro-batches' tapes of its ``n_layer / 2`` layers at once, and
the difference divided by the 8 extra sequences gives floats per token and
layer held (:data:`hvdllm.common.planner.PIPELINE_ACTIVATION_FLOATS`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hvdllm.common import planner as P  # noqa: E402
from hvdllm.common.config import load_config  # noqa: E402

# (n_layer, d_model, n_head, seq_len)
SHAPES = [(2, 256, 8, 256), (2, 256, 8, 128), (2, 128, 8, 256), (2, 256, 4, 256),
          (2, 384, 8, 128), (4, 128, 4, 128)]
#: Micro-batch sizes whose peaks are differenced: large enough that the peak
#: falls in the backward pass, not in the optimizer update.
BATCHES = (4, 8)


def _peak(sets: list[str], steps: int, work: Path, ranks: int = 1) -> float:
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true", TF_CPP_MIN_LOG_LEVEL="2",
               HVDLLM_MEMORY_REPORT=str(work / "memory"), PYTHONPATH=str(REPO))
    cmd = []
    if ranks > 1:
        if os.geteuid() == 0:
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        here = Path(sys.executable).parent / "mpirun"
        cmd = [str(here) if here.exists() else "mpirun", "-np", str(ranks), "--oversubscribe"]
        for key in ("HVDLLM_MEMORY_REPORT", "TF_CPU_ALLOCATOR_USE_BFC"):
            cmd += ["-x", key]
    cmd += [sys.executable, "-m", "hvdllm", "train", "--set", "train.framework=tensorflow",
           "--set", f"train.steps={steps}", "--set", "output.checkpoint=false",
           "--set", f"output.dir={work / 'run'}"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"{sets}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return json.loads((work / "memory" / "memory-rank-0.json").read_text())["allocator_peak_delta"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="gpt")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--pipeline", action="store_true",
                    help="fit what a pipeline stage holds per micro-batch in flight")
    args = ap.parse_args()
    batches, ranks, table = BATCHES, 1, P.ACTIVATION_FLOATS
    if args.pipeline:
        batches, ranks, table = (2, 4), 2, P.PIPELINE_ACTIVATION_FLOATS
    rows, targets = [], []
    with tempfile.TemporaryDirectory(prefix="plan-fit-") as tmp:
        for i, (n_layer, d, heads, seq) in enumerate(SHAPES):
            base = [f"model.family={args.family}", f"model.n_layer={n_layer}",
                    f"model.d_model={d}", f"model.n_head={heads}", f"model.seq_len={seq}"]
            peaks = []
            for b in batches:
                sets = base + [f"train.global_batch_size={b}", f"train.micro_batch_size={b}"]
                if args.pipeline:
                    sets = base + [f"train.global_batch_size={4 * b}",
                                   f"train.micro_batch_size={b}", "parallel.pp=2",
                                   "parallel.schedule=gpipe"]
                peaks.append(_peak(sets, args.steps, Path(tmp) / f"{i}-{b}", ranks))
            m = load_config(None, base + ["train.framework=tensorflow"]).model
            if args.pipeline:  # stage 0: no head; four micro-batches held
                extra = 4 * (batches[1] - batches[0])
                floats = (peaks[1] - peaks[0]) / extra / 4 / (seq * (n_layer // 2))
            else:
                logits = 2.0 * m.vocab_size * 4 * seq
                floats = (((peaks[1] - peaks[0]) / (batches[1] - batches[0]) - logits)
                          / 4 / (seq * n_layer))
            pred = P.activation_floats("tensorflow", m, 1, False, table)
            print(f"n_layer {n_layer} d {d:4d} heads {heads} seq {seq:4d}: "
                  f"{floats:9.1f} floats/token/layer (planner {pred:9.1f}, "
                  f"{pred / floats - 1:+6.1%})", flush=True)
            rows.append([d, m.ff_width, heads * seq, 1.0])
            targets.append(floats)
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)
    print("least squares: a_h {:.2f}  a_ff {:.2f}  a_hs {:.2f}  const {:.1f}".format(*coef))
    return 0


if __name__ == "__main__":
    sys.exit(main())
