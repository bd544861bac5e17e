"""The framework-free half of a pipeline executor: plan, messages, the walk over the actions.

Both executors (:mod:`hvdllm.torch.pipeline.executor` and
:mod:`hvdllm.tensorflow.pipeline.executor`) derive from
:class:`StageWalker`, which owns everything of a stage that is not
tensors: the action list of each micro-batch count
(:func:`hvdllm.common.schedules.build_schedule`), the tag and the name of
each message, the shape agreement with the neighbour stages, the step's
walk and the loss every stage reports.

The walk follows the contract written in :mod:`hvdllm.common.schedules`:

* ``RECV_ACT`` / ``RECV_GRAD`` post a non-blocking receive into the step's
  inbox; the ``FORWARD`` / ``BACKWARD`` that consumes it takes it from
  there and waits for it (checking the agreed dtype and shape);
* ``SEND_ACT`` / ``SEND_GRAD`` post a non-blocking send of what the
  executor hands over for that message.  Completed sends are dropped as the
  walk goes on, the rest are waited for at the end of the step.

An executor supplies the compute (``forward(mb, c)`` and
``backward(mb, c)``), the payload of each send, and a link whose
``isend(tensor, peer, tag, what)`` / ``irecv(peer, tag, spec, what)`` move
its framework's tensors (a wrapper of :class:`hvdllm.common.p2p.Link`).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import numpy as np

from . import timeline, watchdog
from .errors import ConfigError
from .schedules import (BACKWARD, FORWARD, RECV_ACT, RECV_GRAD, SEND_ACT, SEND_GRAD, Action,
                        ActionKind, bubble_fraction_theory, build_schedule,
                        check_interleaved_shape, global_chunk_index, max_message_tag,
                        message_tag)


class StageWalker:
    """Plan, message tags and names, shape agreement and the step's walk of one stage.

    Args:
        link: this stage's link (an adapter's wrapper of
            :class:`~hvdllm.common.p2p.Link` over the pipeline group).
        spec: the adapter's spec of the tensors crossing a chunk boundary
            for one micro-batch (activations and their gradients).
        chunk_indices: global index of each chunk this stage holds, in
            local order.
        schedule: "gpipe", "1f1b" or "interleaved".
        virtual_stages: chunks per stage.
        verbose: print warnings (give it to one rank only).
    """

    def __init__(self, link: Any, spec: Any, chunk_indices: Sequence[int], schedule: str,
                 virtual_stages: int, verbose: bool):
        if len(chunk_indices) != virtual_stages:
            raise ValueError(f"stage holds {len(chunk_indices)} chunks but virtual_stages is "
                             f"{virtual_stages}")
        self.link = link
        self.group = link.group
        self.stage, self.num_stages = self.group.rank, self.group.size
        self.spec = spec
        self.schedule = schedule
        self.virtual_stages = virtual_stages
        self.verbose = verbose
        self.num_chunks = self.num_stages * virtual_stages
        self._chunk_indices = tuple(chunk_indices)
        self._plans: dict[int, list[Action]] = {}
        self._last_m = 1
        self._agree_shapes()

    # -- set-up ------------------------------------------------------------
    def _agree_shapes(self) -> None:
        """Tell the neighbour stages what this stage sends; check what they send."""
        outgoing, incoming = [], []
        for c, g in enumerate(self._chunk_indices):
            if g < self.num_chunks - 1:
                nxt = (self.stage + 1) % self.num_stages
                outgoing.append((nxt, self.tag(SEND_ACT, 0, c, nxt), self.spec))
                incoming.append((nxt, self.tag(RECV_GRAD, 0, c, nxt), self.spec,
                                 f"gradients of chunk {g}'s output"))
            if g > 0:
                prev = (self.stage - 1) % self.num_stages
                incoming.append((prev, self.tag(RECV_ACT, 0, c, prev), self.spec,
                                 f"activations from chunk {g - 1}"))
                outgoing.append((prev, self.tag(SEND_GRAD, 0, c, prev), self.spec))
        self.link.agree(outgoing, incoming)

    def tag(self, kind: ActionKind, microbatch: int, chunk: int, peer: int) -> int:
        """MPI tag of a message (:func:`~hvdllm.common.schedules.message_tag`)."""
        return message_tag(Action(kind, microbatch, chunk, peer), self.stage, self.num_stages,
                           self.virtual_stages)

    def tied_tag(self) -> int:
        """A tag past every message of the last step (for the tied-embedding exchange)."""
        return max_message_tag(self.num_stages, self._last_m, self.virtual_stages) + 1

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

    # -- one step --------------------------------------------------------------
    def walk(self, num_microbatches: int, inbox: dict, forward: Callable[[int, int], None],
             backward: Callable[[int, int], None],
             outgoing: Callable[[ActionKind, int, int], Any]) -> None:
        """Walk the action list of one step.

        Args:
            num_microbatches: micro-batches of the step.
            inbox: where posted receives go, keyed ``(kind, microbatch,
                chunk)``; ``forward`` and ``backward`` pop theirs.  It must
                be empty at the end.
            forward: runs ``(microbatch, local chunk)``.
            backward: runs ``(microbatch, local chunk)``.
            outgoing: the tensor a ``SEND_ACT`` / ``SEND_GRAD`` of
                ``(kind, microbatch, chunk)`` carries.
        """
        actions = self.plan(num_microbatches)
        self._last_m = num_microbatches
        wd = watchdog.current()
        prof = timeline.current()
        sends: list = []
        for action in actions:
            kind, mb, c = action.kind, action.microbatch, action.chunk
            if kind is RECV_ACT or kind is RECV_GRAD:
                prof.mark("post recv of " + self.message_name(kind, mb, c))
                inbox[kind, mb, c] = self.link.irecv(action.peer, self.tag(kind, mb, c, action.peer),
                                                     self.spec, self.message_name(kind, mb, c))
            elif kind is FORWARD:
                wd.set_micro(mb)
                with prof.span("forward", mb=mb, chunk=c):
                    forward(mb, c)
            elif kind is BACKWARD:
                wd.set_micro(mb)
                with prof.span("backward", mb=mb, chunk=c):
                    backward(mb, c)
            else:
                prof.mark("post send of " + self.message_name(kind, mb, c))
                sends.append(self.link.isend(outgoing(kind, mb, c), action.peer,
                                             self.tag(kind, mb, c, action.peer),
                                             self.message_name(kind, mb, c)))
            sends = [s for s in sends if not s.test()]
        for s in sends:
            s.wait()
        if inbox:
            raise RuntimeError(f"pipeline stage {self.stage}: the schedule left receives "
                               f"behind: {sorted(inbox, key=str)}")

    def message_name(self, kind: ActionKind, microbatch: int, chunk: int) -> str:
        """What a message carries, for errors: "activation of micro-batch 3 (chunk 0 -> 1)"."""
        g = global_chunk_index(self.stage, chunk, self.num_stages)
        if kind.carries_activation:
            a, b = (g, g + 1) if kind is SEND_ACT else (g - 1, g)
            return f"activation of micro-batch {microbatch} (chunk {a} -> {b})"
        a, b = (g, g - 1) if kind is SEND_GRAD else (g + 1, g)
        return f"gradient of micro-batch {microbatch} (chunk {a} -> {b})"

    def shared_loss(self, losses: dict[int, float], num_microbatches: int) -> float:
        """Mean loss of the step (summed in micro-batch order), broadcast from the last stage."""
        total = 0.0
        for mb in sorted(losses):
            total += losses[mb]
        last = self.num_stages - 1
        value = np.array([total / num_microbatches if self.stage == last else 0.0], np.float64)
        return float(self.group.broadcast(value, root=last)[0])

