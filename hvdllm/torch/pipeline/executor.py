"""The PyTorch pipeline executor: walk one stage's action list for a training step.

The action list comes from :func:`hvdllm.common.schedules.build_schedule`
and the executor follows the contract written there:

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
import sys
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch
import torch.nn as nn

from ...common import watchdog
from ...common.comm import Group
from ...common.errors import ConfigError
from ...common.schedules import (BACKWARD, FORWARD, RECV_ACT, RECV_GRAD, SEND_ACT, SEND_GRAD,
                                 Action, bubble_fraction_theory, build_schedule,
                                 check_interleaved_shape, chunk_location, global_chunk_index,
                                 max_message_tag, message_tag)
from ..models import CausalLM
from .p2p import RecvHandle, SendHandle, StageLink, TensorSpec
from .stage import Chunk, run_chunk


class PipelineExecutor:
    """Runs one pipeline stage: its chunks of the model and its schedule.

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
        if len(chunks) != virtual_stages:
            raise ValueError(f"stage holds {len(chunks)} chunks but virtual_stages is "
                             f"{virtual_stages}")
        self.model = model
        self.chunks = list(chunks)
        self.group = group
        self.stage, self.num_stages = group.rank, group.size
        self.schedule = schedule
        self.virtual_stages = virtual_stages
        self.recompute = recompute
        self.spec = activation_spec
        self.verbose = verbose
        self.num_chunks = self.num_stages * virtual_stages
        self.link = StageLink(group)
        # Self-describing messages on the link's communicator, for generation.
        self._control = Group(group.kind, self.link.comm, group.ranks,
                              timeout_sec=group.timeout_sec)
        self.tied_weight = tied_weight
        self.tied_peer = None
        if tied_weight is not None:
            self.tied_peer = self.num_stages - 1 if self.stage == 0 else 0
        self._plans: dict[int, list[Action]] = {}
        self._last_m = 1
        self._agree_shapes()

    # -- set-up ------------------------------------------------------------
    def _agree_shapes(self) -> None:
        """Tell the neighbour stages what this stage sends; check what they send."""
        outgoing, incoming = [], []
        for c, chunk in enumerate(self.chunks):
            g = chunk.index
            if g < self.num_chunks - 1:
                nxt = (self.stage + 1) % self.num_stages
                outgoing.append((nxt, self._tag(SEND_ACT, 0, c, nxt), self.spec))
                incoming.append((nxt, self._tag(RECV_GRAD, 0, c, nxt), self.spec,
                                 f"gradients of chunk {g}'s output"))
            if g > 0:
                prev = (self.stage - 1) % self.num_stages
                incoming.append((prev, self._tag(RECV_ACT, 0, c, prev), self.spec,
                                 f"activations from chunk {g - 1}"))
                outgoing.append((prev, self._tag(SEND_GRAD, 0, c, prev), self.spec))
        self.link.agree(outgoing, incoming)

    def _tag(self, kind, microbatch: int, chunk: int, peer: int) -> int:
        return message_tag(Action(kind, microbatch, chunk, peer), self.stage, self.num_stages,
                           self.virtual_stages)

    def plan(self, num_microbatches: int) -> list[Action]:
        """This stage's action list for ``num_microbatches`` (built once per count)."""
        if num_microbatches not in self._plans:
            p, m, v = self.num_stages, num_microbatches, self.virtual_stages
            if self.schedule == "interleaved":
                try:
                    check_interleaved_shape(p, m, v)
                except ValueError as exc:
                    raise ConfigError(f"{exc} (micro-batches per step = global_batch_size / "
                                      f"(dp * micro_batch_size))") from None
            self.link.check_tags(max_message_tag(p, m, v) + 1)
            if m < p and self.verbose:
                bubble = bubble_fraction_theory(self.schedule, p, m, v)
                print(f"hvdllm: warning: {m} micro-batch(es) for {p} pipeline stages: about "
                      f"{bubble:.0%} of each step is pipeline bubble ({self.schedule}: "
                      f"(p-1)/(m+p-1)); use at least {p} micro-batches per step (raise "
                      f"train.global_batch_size or lower train.micro_batch_size)",
                      file=sys.stderr, flush=True)
            self._plans[m] = build_schedule(self.schedule, p, m, self.stage, v)
        return self._plans[num_microbatches]

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
        actions = self.plan(m)
        self._last_m = m
        step = _StepState(micro_batches, grad_sync or contextlib.nullcontext)
        self._autocast = autocast or contextlib.nullcontext
        self._scale_loss = scale_loss or (lambda loss: loss)
        for action in actions:
            kind, mb, c = action.kind, action.microbatch, action.chunk
            if kind is RECV_ACT or kind is RECV_GRAD:
                step.recvs[kind, mb, c] = self.link.irecv(
                    action.peer, self._tag(kind, mb, c, action.peer), self.spec,
                    self._what(kind, mb, c))
            elif kind is FORWARD:
                self._forward(step, mb, c)
            elif kind is BACKWARD:
                self._backward(step, mb, c)
            else:
                data = step.held[mb, c][1] if kind is SEND_ACT else step.input_grads.pop((mb, c))
                step.sends.append(self.link.isend(data, action.peer,
                                                  self._tag(kind, mb, c, action.peer),
                                                  self._what(kind, mb, c)))
            step.sends = [s for s in step.sends if not s.test()]
        for s in step.sends:
            s.wait()
        if step.held or step.recvs or step.input_grads:
            raise RuntimeError(f"pipeline stage {self.stage}: the schedule left work behind: "
                               f"{sorted(step.held)} {sorted(step.recvs)} "
                               f"{sorted(step.input_grads)}")
        return self._shared_loss(step.losses, m)

    def _forward(self, step: "_StepState", mb: int, c: int) -> None:
        watchdog.current().set_micro(mb)
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
        watchdog.current().set_micro(mb)
        inp, out = step.held.pop((mb, c))
        m = len(step.micro_batches)
        with step.sync() if mb == m - 1 else contextlib.nullcontext():
            if self.chunks[c].last:
                self._scale_loss(out / m).backward()
            else:
                torch.autograd.backward(out, step.recvs.pop((RECV_GRAD, mb, c)).wait())
        if inp is not None:
            step.input_grads[mb, c] = inp.grad

    def _what(self, kind, mb: int, c: int) -> str:
        g = global_chunk_index(self.stage, c, self.num_stages)
        if kind.carries_activation:
            a, b = (g, g + 1) if kind is SEND_ACT else (g - 1, g)
            return f"activation of micro-batch {mb} (chunk {a} -> {b})"
        a, b = (g, g - 1) if kind is SEND_GRAD else (g + 1, g)
        return f"gradient of micro-batch {mb} (chunk {a} -> {b})"

    def _shared_loss(self, losses: dict[int, float], m: int) -> float:
        """Mean loss of the step (summed in micro-batch order), broadcast from the last stage."""
        total = 0.0
        for mb in sorted(losses):
            total += losses[mb]
        last = self.num_stages - 1
        value = np.array([total / m if self.stage == last else 0.0], np.float64)
        return float(self.group.broadcast(value, root=last)[0])

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
        # Past every tag of the step's own messages (see plan()).
        tag = max_message_tag(self.num_stages, self._last_m, self.virtual_stages) + 1
        other = self.link.exchange(grad, self.tied_peer, tag, "tied embedding gradient")
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
        self.sends: list[SendHandle] = []
        # (microbatch, chunk) -> (input that needs a gradient, or None; output or loss)
        self.held: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.input_grads: dict[tuple[int, int], torch.Tensor] = {}
        self.losses: dict[int, float] = {}
