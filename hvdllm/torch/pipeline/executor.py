"""The PyTorch pipeline executor: walk one stage's action list for a training step.

The action list comes from :func:`hvdllm.common.schedules.build_schedule`
and the walk over it (:class:`hvdllm.common.stage_walk.StageWalker`, shared
with the TensorFlow executor) follows the contract written there:

* ``RECV_ACT`` / ``RECV_GRAD`` post a non-blocking receive
  (:meth:`StageLink.irecv`); the ``FORWARD`` / ``BACKWARD`` that consumes it
  waits for it, checking the agreed dtype and shape.
* ``SEND_ACT`` / ``SEND_GRAD`` post a non-blocking send of what the compute
  just before produced.  Completed sends are dropped as the walk goes on,
  the rest are waited for at the end of the step.
* Both ends of a message use :func:`~hvdllm.common.schedules.message_tag`.

What a stage keeps between the forward and the backward of a
``(micro-batch, chunk)`` pair is its input (to read the input gradient) and
its output (the root of the backward); both are dropped as soon as the
backward has run and the input gradient has been handed to its send, so a
stage holds the activations of exactly the pairs its schedule has in
flight.  With ``recompute`` the chunk's blocks keep only their input and
run again in backward.

The loss is computed on the last stage, scaled by ``1 / m`` in backward as
in gradient accumulation, and its mean over the step is broadcast over the
pipeline group so every rank can log it.  The backwards of the last
micro-batch (each chunk's last backward) run inside the caller's gradient
sync context, which is where data-parallel allreduces start.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch
import torch.nn as nn

from ...common.comm import Group
from ...common.schedules import RECV_ACT, RECV_GRAD, SEND_ACT, chunk_location
from ...common.stage_walk import StageWalker
from ..models import CausalLM
from .p2p import RecvHandle, StageLink, TensorSpec
from .stage import Chunk, run_chunk


class PipelineExecutor(StageWalker):
    """Runs one pipeline stage: its chunks of the model and its schedule.

    The plan, the messages and the walk over the action list are the
    core's (:class:`~hvdllm.common.stage_walk.StageWalker`); this class runs
    the chunks' forwards and backwards with autograd.

    Args:
        model: this stage's cut model (see :func:`~hvdllm.torch.pipeline.stage.cut_stage`).
        chunks: the chunks it holds, in local order.
        group: the pipeline group; this rank is stage ``group.rank``.
        activation_spec: dtype and shape of the tensors crossing a chunk
            boundary for one micro-batch (activations and their gradients).
        schedule: "gpipe", "1f1b" or "interleaved".
        virtual_stages: chunks per stage.
        recompute: recompute each chunk's blocks in backward.
        tied_weight: the GPT head/embedding weight this stage holds when it
            is the first or the last stage, else None.
        verbose: print warnings (give it to one rank only).
    """

    def __init__(self, model: CausalLM, chunks: Sequence[Chunk], group: Group,
                 activation_spec: TensorSpec, schedule: str = "1f1b", virtual_stages: int = 1,
                 recompute: bool = False, tied_weight: nn.Parameter | None = None,
                 verbose: bool = False):
        self.model = model
        self.chunks = list(chunks)
        self.recompute = recompute
        link = StageLink(group)
        # Self-describing messages on the link's communicator, for generation.
        self._control = Group(group.kind, link.comm, group.ranks, timeout_sec=group.timeout_sec)
        self.tied_weight = tied_weight
        self.tied_peer = None
        if tied_weight is not None:
            self.tied_peer = group.size - 1 if group.rank == 0 else 0
        super().__init__(link, activation_spec, [c.index for c in self.chunks], schedule,
                         virtual_stages, verbose)

    # -- one training step ---------------------------------------------------
    def train_step(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]],
                   grad_sync: Callable[[], ContextManager] | None = None, *,
                   autocast: Callable[[], ContextManager] | None = None,
                   scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
        """Forward and backward of every micro-batch through this stage.

        Gradients accumulate into the stage's parameters (each micro-batch's
        loss scaled by ``1 / m``); the caller zeroes them before and steps
        the optimizer after.

        Args:
            micro_batches: (inputs, targets) int64 arrays, the same on every stage.
            grad_sync: context manager factory entered around the backwards
                of the last micro-batch (data-parallel gradient sync).
            autocast: context manager factory entered around each forward
                (mixed precision).
            scale_loss: applied to the last stage's loss before backward
                (fp16 loss scaling; the scale reaches every stage through
                the gradients it sends).

        Returns:
            The step's loss, mean over micro-batches, on every stage.
        """
        m = len(micro_batches)
        step = _StepState(micro_batches, grad_sync or contextlib.nullcontext)
        self._autocast = autocast or contextlib.nullcontext
        self._scale_loss = scale_loss or (lambda loss: loss)
        self.walk(m, step.recvs, lambda mb, c: self._forward(step, mb, c),
                  lambda mb, c: self._backward(step, mb, c),
                  lambda kind, mb, c: (step.held[mb, c][1] if kind is SEND_ACT
                                       else step.input_grads.pop((mb, c))))
        if step.held or step.input_grads:
            raise RuntimeError(f"pipeline stage {self.stage}: the schedule left work behind: "
                               f"{sorted(step.held)} {sorted(step.input_grads)}")
        return self.shared_loss(step.losses, m)

    def _forward(self, step: "_StepState", mb: int, c: int) -> None:
        chunk = self.chunks[c]
        x, y = step.micro_batches[mb]
        inp = None
        if chunk.first:
            inputs = torch.from_numpy(x)
        else:
            inp = inputs = step.recvs.pop((RECV_ACT, mb, c)).wait().requires_grad_()
        with self._autocast():
            out = run_chunk(self.model, chunk, inputs,
                            torch.from_numpy(y) if chunk.last else None, self.recompute)
        if chunk.last:
            step.losses[mb] = out.item()
        step.held[mb, c] = (inp, out)

    def _backward(self, step: "_StepState", mb: int, c: int) -> None:
        inp, out = step.held.pop((mb, c))
        m = len(step.micro_batches)
        with step.sync() if mb == m - 1 else contextlib.nullcontext():
            if self.chunks[c].last:
                self._scale_loss(out / m).backward()
            else:
                torch.autograd.backward(out, step.recvs.pop((RECV_GRAD, mb, c)).wait())
        if inp is not None:
            step.input_grads[mb, c] = inp.grad

    # -- evaluation -------------------------------------------------------------
    @torch.no_grad()
    def eval_loss(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]], *,
                  autocast: Callable[[], ContextManager] | None = None) -> float:
        """Forward-only mean loss of ``micro_batches``, returned on every stage.

        Each micro-batch goes through the chunks in model order, one after
        the other (no schedule, nothing to overlap with); activations move
        with the group's self-describing point-to-point calls, as in
        :meth:`forward_logits`.  The last stage computes the losses.
        """
        autocast = autocast or contextlib.nullcontext
        p, control = self.num_stages, self._control
        losses: dict[int, float] = {}
        for mb, (x, y) in enumerate(micro_batches):
            for g in range(self.num_chunks):
                stage, c = chunk_location(g, p)
                if stage != self.stage:
                    continue
                chunk = self.chunks[c]
                if chunk.first:
                    inputs = torch.from_numpy(x)
                else:
                    inputs = torch.from_numpy(control.recv((stage - 1) % p, tag=g))
                with autocast():
                    out = run_chunk(self.model, chunk, inputs,
                                    torch.from_numpy(y) if chunk.last else None, False)
                if chunk.last:
                    losses[mb] = out.item()
                else:
                    control.send(out.float().numpy(), (stage + 1) % p, tag=g + 1)
        return self.shared_loss(losses, len(micro_batches))

    # -- tied embedding -------------------------------------------------------
    def reduce_tied_grads(self) -> None:
        """Sum the tied head/embedding gradient of the first and last stages (both get it).

        Call after the data-parallel average and before the optimizer step.
        Both stages add the same two tensors, so their copies stay bit-equal.
        """
        if self.tied_weight is None:
            return
        grad = self.tied_weight.grad
        if grad is None:
            grad = self.tied_weight.grad = torch.zeros_like(self.tied_weight)
        other = self.link.exchange(grad, self.tied_peer, self.tied_tag(),
                                   "tied embedding gradient")
        grad.add_(other)

    # -- inference ------------------------------------------------------------
    def language_model(self) -> CausalLM:
        """A :class:`CausalLM` whose forward runs the whole pipeline (for ``generate``)."""
        return _PipelinedLM(self)

    @torch.no_grad()
    def forward_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits of ``idx`` (b, t) through every chunk, returned on every stage.

        Messages carry their own shape here (sequence lengths vary), so this
        uses the group's self-describing point-to-point calls.
        """
        p, control = self.num_stages, self._control
        x = idx
        for g in range(self.num_chunks):
            stage, c = chunk_location(g, p)
            if stage != self.stage:
                continue
            if g > 0:
                x = torch.from_numpy(control.recv((stage - 1) % p, tag=g))
            x = self.model.embed(idx) if self.chunks[c].first else x
            for key in self.chunks[c].keys:
                x = self.model.run_block(key, x)
            if g < self.num_chunks - 1:
                control.send(x.numpy(), (stage + 1) % p, tag=g + 1)
        logits = self.model.head(x).numpy() if self.stage == p - 1 else None
        return torch.from_numpy(control.broadcast_object(logits, root=p - 1))


class _PipelinedLM(CausalLM):
    """Adapter that lets :meth:`CausalLM.generate` sample through a pipeline."""

    def __init__(self, executor: PipelineExecutor):
        super().__init__()
        self._executor = executor
        self.criterion = executor.model.criterion
        self.max_seq_len = executor.model.max_seq_len

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self._executor.forward_logits(idx)


class _StepState:
    """What one training step of a stage has in flight."""

    def __init__(self, micro_batches: Sequence[tuple[np.ndarray, np.ndarray]],
                 sync: Callable[[], ContextManager]):
        self.micro_batches = micro_batches
        self.sync = sync
        self.recvs: dict[tuple, RecvHandle] = {}
        # (microbatch, chunk) -> (input that needs a gradient, or None; output or loss)
        self.held: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.input_grads: dict[tuple[int, int], torch.Tensor] = {}
        self.losses: dict[int, float] = {}
