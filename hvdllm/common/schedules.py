"""Pipeline-parallel schedules as plain data, the same for PyTorch and TensorFlow.

A schedule is a pure function ``(num_stages, num_microbatches, stage,
virtual_stages) -> list[Action]``: the ordered work of one pipeline stage
(one rank of the pipeline group) for one training step.  Nothing here knows
about tensors, frameworks or MPI; :mod:`hvdllm.common.pipeline_sim` runs the
lists of all stages together to check them and to measure their bubble.

Model chunks.  With ``v`` virtual stages per rank the model is cut into
``p * v`` consecutive chunks (``p`` = number of stages).  Rank ``s`` holds
the chunks ``s, s + p, s + 2p, ...``; ``Action.chunk`` is the *local* index
``c`` of such a chunk, whose global index is ``c * p + s``.  With ``v == 1``
every rank holds one chunk and ``chunk`` is always 0.  Activations flow from
global chunk ``g`` to ``g + 1`` (so from stage ``s`` to ``(s + 1) % p``) and
gradients flow back from ``g + 1`` to ``g``.

How an executor walks a list (the contract the schedules are built for):

* ``RECV_ACT`` / ``RECV_GRAD`` come right before the compute that consumes
  the data.  The executor posts a non-blocking receive (``irecv``) there and
  waits on it only when the consuming ``FORWARD`` / ``BACKWARD`` starts.
* ``SEND_ACT`` / ``SEND_GRAD`` come right after the compute that produces the
  data.  The executor posts a non-blocking send (``isend``) and keeps the
  buffer alive; it waits on all its send requests at the end of the step.
* Both sides of a message use :func:`message_tag`, which is unique for every
  message of one step, so receives can be posted in any order.

Because sends never block and a stage waits only for data that some earlier
compute of another stage produces, such an executor cannot deadlock when the
compute orders are consistent; the simulator checks exactly that for every
schedule here (see ``tests/test_schedules.py``).

Schedules (``SCHEDULES``):

* ``"gpipe"``: all forwards, then all backwards.  Holds the activations of
  all ``m`` micro-batches at once.
* ``"1f1b"``: ``p - stage - 1`` warm-up forwards, then one forward and one
  backward in turn, then the remaining backwards.  Same bubble as GPipe,
  but a stage holds at most ``p - stage`` micro-batches.
* ``"interleaved"``: 1F1B over ``v`` chunks per rank (the Megatron-LM
  interleaved schedule), which cuts the bubble by a factor of about ``v``.
  With ``v == 1`` it is exactly ``"1f1b"``.  With ``v > 1`` it needs
  ``p >= 2`` and ``m`` divisible by ``p``: micro-batches go through the
  chunks in groups of ``p``, and the ``p`` forwards of a group keep a stage
  busy for exactly the time the group's first micro-batch needs to come back
  around to the stage's next chunk.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

SCHEDULES = ("gpipe", "1f1b", "interleaved")


class ActionKind(enum.Enum):
    """What an :class:`Action` does."""

    FORWARD = "forward"
    BACKWARD = "backward"
    SEND_ACT = "send_act"
    RECV_ACT = "recv_act"
    SEND_GRAD = "send_grad"
    RECV_GRAD = "recv_grad"

    @property
    def is_compute(self) -> bool:
        return self in (ActionKind.FORWARD, ActionKind.BACKWARD)

    @property
    def is_send(self) -> bool:
        return self in (ActionKind.SEND_ACT, ActionKind.SEND_GRAD)

    @property
    def is_recv(self) -> bool:
        return self in (ActionKind.RECV_ACT, ActionKind.RECV_GRAD)

    @property
    def carries_activation(self) -> bool:
        """True for messages that carry activations (forward direction)."""
        return self in (ActionKind.SEND_ACT, ActionKind.RECV_ACT)


FORWARD = ActionKind.FORWARD
BACKWARD = ActionKind.BACKWARD
SEND_ACT = ActionKind.SEND_ACT
RECV_ACT = ActionKind.RECV_ACT
SEND_GRAD = ActionKind.SEND_GRAD
RECV_GRAD = ActionKind.RECV_GRAD


@dataclass(frozen=True)
class Action:
    """One step of a stage's schedule.

    Attributes:
        kind: what to do.
        microbatch: micro-batch index in ``[0, num_microbatches)``.
        chunk: local model-chunk index on this rank, in ``[0, virtual_stages)``.
        peer: for sends and receives, the stage (rank in the pipeline group)
            on the other end; ``None`` for compute.
    """

    kind: ActionKind
    microbatch: int
    chunk: int = 0
    peer: int | None = None

    def __str__(self) -> str:
        text = f"{self.kind.name}(mb={self.microbatch}, chunk={self.chunk}"
        if self.kind.is_send:
            text += f", to stage {self.peer}"
        elif self.kind.is_recv:
            text += f", from stage {self.peer}"
        return text + ")"


# -- chunk arithmetic and message tags ----------------------------------------

def global_chunk_index(stage: int, chunk: int, num_stages: int) -> int:
    """Position in the whole model of local chunk ``chunk`` on ``stage``.

    Args:
        stage: rank in the pipeline group.
        chunk: local chunk index on that rank.
        num_stages: pipeline degree ``p``.
    """
    return chunk * num_stages + stage


def chunk_location(global_chunk: int, num_stages: int) -> tuple[int, int]:
    """``(stage, local chunk)`` that holds global chunk ``global_chunk``.

    Args:
        global_chunk: chunk position in the whole model.
        num_stages: pipeline degree ``p``.
    """
    return global_chunk % num_stages, global_chunk // num_stages


def message_tag(action: Action, stage: int, num_stages: int, virtual_stages: int = 1) -> int:
    """MPI tag of the message that a send or receive action moves.

    The sender and the receiver of one message compute the same tag, and
    every message of one step has its own tag: the tag encodes the
    micro-batch, the chunk boundary ``b`` the message crosses (between global
    chunks ``b`` and ``b + 1``) and the direction (activation or gradient)::

        tag = 2 * (microbatch * (p * v - 1) + b) + (0 for activations, 1 for gradients)

    Tags lie in ``[0, max_message_tag(...)]``; an executor should check that
    bound against its communicator's ``MPI.TAG_UB``.

    Args:
        action: a send or receive action of ``stage``'s schedule.
        stage: the rank that executes ``action``.
        num_stages: pipeline degree ``p``.
        virtual_stages: chunks per rank ``v``.
    """
    if not (action.kind.is_send or action.kind.is_recv):
        raise ValueError(f"{action} is not a send or receive, so it has no message tag")
    num_chunks = num_stages * virtual_stages
    g = global_chunk_index(stage, action.chunk, num_stages)
    # Sending activations or receiving gradients talks to the next chunk.
    toward_next = action.kind in (SEND_ACT, RECV_GRAD)
    boundary = g if toward_next else g - 1
    if not 0 <= boundary < num_chunks - 1:
        raise ValueError(
            f"{action} on stage {stage} crosses no chunk boundary "
            f"(global chunk {g} of {num_chunks})"
        )
    direction = 0 if action.kind.carries_activation else 1
    return 2 * (action.microbatch * (num_chunks - 1) + boundary) + direction


def max_message_tag(num_stages: int, num_microbatches: int, virtual_stages: int = 1) -> int:
    """Largest tag :func:`message_tag` returns for this pipeline shape (-1 if none).

    Args:
        num_stages: pipeline degree ``p``.
        num_microbatches: micro-batches per step ``m``.
        virtual_stages: chunks per rank ``v``.
    """
    return 2 * num_microbatches * (num_stages * virtual_stages - 1) - 1


# -- validation ------------------------------------------------------------

def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_pipeline_shape(num_stages: int, num_microbatches: int, stage: int | None = None,
                         virtual_stages: int = 1) -> None:
    """Raise ``ValueError`` naming the bad number unless the shape is usable.

    Args:
        num_stages: pipeline degree ``p`` (>= 1).
        num_microbatches: micro-batches per step ``m`` (>= 1).
        stage: a stage index in ``[0, p)``, or ``None`` to skip that check.
        virtual_stages: chunks per rank ``v`` (>= 1).
    """
    _check_positive_int("num_stages", num_stages)
    _check_positive_int("num_microbatches", num_microbatches)
    _check_positive_int("virtual_stages", virtual_stages)
    if stage is not None and (not isinstance(stage, int) or isinstance(stage, bool)
                              or not 0 <= stage < num_stages):
        raise ValueError(f"stage={stage!r} out of range [0, {num_stages}) for num_stages={num_stages}")


def check_interleaved_shape(num_stages: int, num_microbatches: int, virtual_stages: int) -> None:
    """Raise ``ValueError`` unless the interleaved schedule supports this shape.

    Valid: ``v == 1`` (plain 1F1B, any ``p`` and ``m``), or ``v > 1`` with
    ``p >= 2`` and ``m`` a multiple of ``p``.

    Args:
        num_stages: pipeline degree ``p``.
        num_microbatches: micro-batches per step ``m``.
        virtual_stages: chunks per rank ``v``.
    """
    check_pipeline_shape(num_stages, num_microbatches, None, virtual_stages)
    if virtual_stages == 1:
        return
    if num_stages < 2:
        raise ValueError(
            f"the interleaved schedule with virtual_stages={virtual_stages} needs at least 2 "
            f"pipeline stages, got num_stages={num_stages}"
        )
    if num_microbatches % num_stages:
        raise ValueError(
            f"the interleaved schedule with virtual_stages={virtual_stages} needs "
            f"num_microbatches divisible by num_stages, got num_microbatches={num_microbatches} "
            f"and num_stages={num_stages}"
        )


# -- building a stage's action list ------------------------------------------

def _with_messages(compute: list[tuple[ActionKind, int, int]], stage: int, num_stages: int,
                   virtual_stages: int) -> list[Action]:
    """Wrap a compute order with its receives (just before) and sends (just after)."""
    last_chunk = num_stages * virtual_stages - 1
    prev_stage = (stage - 1) % num_stages
    next_stage = (stage + 1) % num_stages
    actions: list[Action] = []
    for kind, mb, chunk in compute:
        g = global_chunk_index(stage, chunk, num_stages)
        if kind is FORWARD:
            if g > 0:
                actions.append(Action(RECV_ACT, mb, chunk, prev_stage))
            actions.append(Action(FORWARD, mb, chunk))
            if g < last_chunk:
                actions.append(Action(SEND_ACT, mb, chunk, next_stage))
        else:
            if g < last_chunk:
                actions.append(Action(RECV_GRAD, mb, chunk, next_stage))
            actions.append(Action(BACKWARD, mb, chunk))
            if g > 0:
                actions.append(Action(SEND_GRAD, mb, chunk, prev_stage))
    return actions


def _warmup_then_alternate(forwards: list[tuple[int, int]], backwards: list[tuple[int, int]],
                           num_warmup: int) -> list[tuple[ActionKind, int, int]]:
    """``num_warmup`` forwards, then forward/backward pairs, then the remaining backwards."""
    num_warmup = min(num_warmup, len(forwards))
    order = [(FORWARD, mb, c) for mb, c in forwards[:num_warmup]]
    for (f_mb, f_c), (b_mb, b_c) in zip(forwards[num_warmup:], backwards):
        order += [(FORWARD, f_mb, f_c), (BACKWARD, b_mb, b_c)]
    num_steady = len(forwards) - num_warmup
    order += [(BACKWARD, mb, c) for mb, c in backwards[num_steady:]]
    return order


def pipeline_schedule_gpipe(num_stages: int, num_microbatches: int, stage: int) -> list[Action]:
    """GPipe: every forward of the step, then every backward, both in micro-batch order.

    Args:
        num_stages: pipeline degree ``p``.
        num_microbatches: micro-batches per step ``m``.
        stage: this rank's index in the pipeline group.
    """
    check_pipeline_shape(num_stages, num_microbatches, stage)
    microbatches = [(mb, 0) for mb in range(num_microbatches)]
    order = _warmup_then_alternate(microbatches, microbatches, num_microbatches)
    return _with_messages(order, stage, num_stages, 1)


def pipeline_schedule_1f1b(num_stages: int, num_microbatches: int, stage: int) -> list[Action]:
    """1F1B (PipeDream-flush): warm-up, one forward one backward, cool-down.

    Stage ``s`` runs ``min(p - s - 1, m)`` warm-up forwards, so it holds the
    activations of at most ``p - s`` micro-batches at a time.

    Args:
        num_stages: pipeline degree ``p``.
        num_microbatches: micro-batches per step ``m``.
        stage: this rank's index in the pipeline group.
    """
    check_pipeline_shape(num_stages, num_microbatches, stage)
    microbatches = [(mb, 0) for mb in range(num_microbatches)]
    order = _warmup_then_alternate(microbatches, microbatches, num_stages - stage - 1)
    return _with_messages(order, stage, num_stages, 1)


def _interleaved_order(num_stages: int, num_microbatches: int, virtual_stages: int,
                       backward: bool) -> list[tuple[int, int]]:
    """``(microbatch, chunk)`` pairs in the order a rank runs them.

    Micro-batches go in groups of ``p``; a group runs through chunk 0, then
    chunk 1, ... (backwards: the last chunk first).
    """
    order = []
    for group_start in range(0, num_microbatches, num_stages):
        for step in range(virtual_stages):
            chunk = virtual_stages - 1 - step if backward else step
            order += [(group_start + i, chunk) for i in range(num_stages)]
    return order


def pipeline_schedule_interleaved(num_stages: int, num_microbatches: int, stage: int,
                                  virtual_stages: int = 1) -> list[Action]:
    """Interleaved 1F1B over ``virtual_stages`` model chunks per rank.

    Stage ``s`` warms up with ``2 * (p - s - 1) + (v - 1) * p`` forwards (the
    number it can run before the gradient of its first backward returns),
    then alternates forward and backward, then drains the backwards.  With
    ``v == 1`` this returns :func:`pipeline_schedule_1f1b`.  Validity rules:
    see :func:`check_interleaved_shape`.

    Args:
        num_stages: pipeline degree ``p``.
        num_microbatches: micro-batches per step ``m``.
        stage: this rank's index in the pipeline group.
        virtual_stages: chunks per rank ``v``.
    """
    check_pipeline_shape(num_stages, num_microbatches, stage, virtual_stages)
    check_interleaved_shape(num_stages, num_microbatches, virtual_stages)
    if virtual_stages == 1:
        return pipeline_schedule_1f1b(num_stages, num_microbatches, stage)
    forwards = _interleaved_order(num_stages, num_microbatches, virtual_stages, backward=False)
    backwards = _interleaved_order(num_stages, num_microbatches, virtual_stages, backward=True)
    num_warmup = 2 * (num_stages - stage - 1) + (virtual_stages - 1) * num_stages
    order = _warmup_then_alternate(forwards, backwards, num_warmup)
    return _with_messages(order, stage, num_stages, virtual_stages)


# -- registry ------------------------------------------------------------------

_BUILDERS: dict[str, Callable[..., list[Action]]] = {
    "gpipe": pipeline_schedule_gpipe,
    "1f1b": pipeline_schedule_1f1b,
    "interleaved": pipeline_schedule_interleaved,
}


def _check_schedule_name(name: str, virtual_stages: int) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown pipeline schedule {name!r}; valid names: {', '.join(SCHEDULES)}")
    if name != "interleaved" and virtual_stages != 1:
        raise ValueError(
            f"the {name!r} schedule has one chunk per rank, got virtual_stages={virtual_stages}; "
            f"use 'interleaved' for virtual stages"
        )


def build_schedule(name: str, num_stages: int, num_microbatches: int, stage: int,
                   virtual_stages: int = 1) -> list[Action]:
    """The action list of ``stage`` under the schedule called ``name``.

    Args:
        name: one of :data:`SCHEDULES`.
        num_stages: pipeline degree ``p``.
        num_microbatches: micro-batches per step ``m``.
        stage: this rank's index in the pipeline group.
        virtual_stages: chunks per rank ``v``; only ``"interleaved"`` accepts ``v > 1``.
    """
    _check_schedule_name(name, virtual_stages)
    if name == "interleaved":
        return pipeline_schedule_interleaved(num_stages, num_microbatches, stage, virtual_stages)
    return _BUILDERS[name](num_stages, num_microbatches, stage)


def bubble_fraction_theory(name: str, num_stages: int, num_microbatches: int,
                           virtual_stages: int = 1) -> float:
    """Idle share of the step that theory predicts, with free communication.

    ``(p - 1) / (m + p - 1)`` for GPipe and 1F1B, ``(p - 1) / (v * m + p - 1)``
    for the interleaved schedule.

    Args:
        name: one of :data:`SCHEDULES`.
        num_stages: pipeline degree ``p``.
        num_microbatches: micro-batches per step ``m``.
        virtual_stages: chunks per rank ``v``.
    """
    check_pipeline_shape(num_stages, num_microbatches, None, virtual_stages)
    _check_schedule_name(name, virtual_stages)
    p, m, v = num_stages, num_microbatches, virtual_stages
    return (p - 1) / (v * m + p - 1)
