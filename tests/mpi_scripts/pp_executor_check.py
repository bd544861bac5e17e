"""Run under mpirun -np 2 or 4 (every rank one stage): the pipeline executor against one process.

Usage: pp_executor_check.py FAMILY ("gpt" or "llama").

For each schedule ("gpipe", "1f1b", "interleaved" with 2 chunks per stage)
and each recompute setting, one step of the pipeline must give the
single-process loss (on every stage) and every gradient of the stage's
parameters within 1e-5; recompute must agree with no recompute to the same
tolerance.  After the step no saved activation may be left alive, and the
peak of saved activations must follow the schedules: GPipe holds every
micro-batch, 1F1B at most ``p`` on stage 0, recompute less than either.
Fewer micro-batches than stages must still give the single-process loss.
For GPT, the tied head/embedding copies on the first and last stages must
stay bit-identical through optimizer steps, with the single-process loss.
"""
import gc
import sys

import torch

from pp_common import full_model, micro_batches, rank, reference_step, setup, size, stage_executor
from hvdllm.torch.pipeline import SavedTensorMeter

TOL = 1e-5
family = sys.argv[1]
groups = setup()
n_layer = 2 * size  # interleaved with 2 chunks per stage needs n_layer divisible by 2 * pp
m = 2 * size  # and a multiple of pp micro-batches
batches = micro_batches(m)
reference = full_model(family, n_layer)
ref_loss = reference_step(reference, batches)
ref_grads = {name: p.grad for name, p in reference.named_parameters()}
if family == "gpt":
    ref_grads["lm_head.weight"] = ref_grads["wte.weight"]  # the tied weight's full gradient
checks = 0


def close(what, got, want, tol=TOL):
    global checks
    err = (got - want).abs().max().item() if torch.is_tensor(got) else abs(got - want)
    scale = max(1.0, want.abs().max().item() if torch.is_tensor(want) else abs(want))
    if not err <= tol * scale:
        raise AssertionError(f"stage {rank}/{size} {family}: {what} differs by {err:.3e}")
    checks += 1


peaks = {}
grads = {}
for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
    for recompute in (False, True):
        model, executor = stage_executor(groups, family, n_layer, schedule, v, recompute)
        meter = SavedTensorMeter(model.parameters())
        with meter.watch():
            loss = executor.train_step(batches)
        executor.reduce_tied_grads()
        what = f"{schedule} recompute={recompute}"
        close(f"{what} loss", loss, ref_loss)
        stage_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        assert stage_grads, f"stage {rank} holds no parameters"
        for name, g in stage_grads.items():
            close(f"{what} grad {name}", g, ref_grads[name])
        if recompute:  # the same gradients as without recompute
            for name, g in stage_grads.items():
                close(f"{what} grad {name} against recompute=False", g, grads[schedule][name])
        grads[schedule] = stage_grads
        del executor, loss
        gc.collect()
        left = meter.live_bytes()
        assert left == 0, f"stage {rank} {what}: {left} bytes of activations still alive"
        assert meter.peak_bytes > 0, f"stage {rank} {what}: nothing was measured"
        peaks[schedule, recompute] = meter.peak_bytes
        checks += 1

# Activation memory follows the schedules (stage 0 holds the most under 1F1B).
if rank == 0:
    ratio = peaks["gpipe", False] / peaks["1f1b", False]
    assert ratio > 1.5, f"GPipe/1F1B peak activations on stage 0: {ratio:.2f}, expected ~{m / size}"
for schedule in ("gpipe", "1f1b", "interleaved"):
    assert peaks[schedule, True] < peaks[schedule, False], \
        f"stage {rank} {schedule}: recompute did not lower the peak {peaks}"

# Fewer micro-batches than stages still runs (with one warning from stage 0).
few = micro_batches(size // 2, seed=5)
model, executor = stage_executor(groups, family, n_layer, "1f1b")
close(f"loss with {len(few)} micro-batches for {size} stages", executor.train_step(few),
      reference_step(full_model(family, n_layer), few))

# Tied embedding: the two copies stay bit-identical through optimizer steps.
model, executor = stage_executor(groups, family, n_layer, "1f1b")
reference = full_model(family, n_layer)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
for step in range(3):
    step_batches = micro_batches(m, seed=10 + step)
    opt.zero_grad(set_to_none=True)
    loss = executor.train_step(step_batches)
    executor.reduce_tied_grads()
    opt.step()
    ref_loss = reference_step(reference, step_batches)
    ref_opt.step()
    close(f"loss after {step} optimizer steps", loss, ref_loss)
if executor.tied_weight is not None:
    other = executor.link.exchange(executor.tied_weight.detach(), executor.tied_peer, 0,
                                   "tied weight check")
    assert torch.equal(other, executor.tied_weight.detach()), \
        f"stage {rank}: tied embedding copies differ by " \
        f"{(other - executor.tied_weight).abs().max().item():.3e}"
    close("tied weight against one process", executor.tied_weight.detach(),
          reference.wte.weight.detach())
    checks += 1
elif family == "gpt" and rank in (0, size - 1):
    raise AssertionError(f"stage {rank}: GPT's first and last stages must hold the tied weight")
print(f"pp executor checks passed on stage {rank} ({checks} checks)", flush=True)
