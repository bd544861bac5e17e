"""Run the action lists of all pipeline stages together, without tensors or MPI.

The simulator plays the executor described in :mod:`hvdllm.common.schedules`:
a receive only posts a request, a compute waits for the messages it consumes,
and a send delivers its message at once (communication is free).  Time is
exact (:class:`fractions.Fraction`).  The forward of one micro-batch through
a whole stage costs ``forward_cost`` and its backward ``backward_cost``, so a
chunk costs ``1 / v`` of that with ``v`` virtual stages; the theoretical
bubble fractions are stated in this cost model.

Along the way it checks that the lists are correct, and raises
:class:`ScheduleError` when they are not:

* every send and receive names the right peer, and messages match by
  :func:`~hvdllm.common.schedules.message_tag` and payload kind;
* a FORWARD of global chunk ``g > 0`` has received the activation of chunk
  ``g - 1``; a BACKWARD has run its own forward and, unless it is on the last
  global chunk, received the gradient of chunk ``g + 1``;
* every ``(microbatch, chunk)`` runs at most one forward and one backward,
  and every forward gets its backward;
* no message is left unreceived at the end.

If no stage can move while some still have actions left, it raises
:class:`PipelineDeadlockError` naming each stuck stage and its next action.

Held activations are counted per ``(microbatch, chunk)`` pair: a pair is
held from the end of its forward to the end of its backward.  With
``v == 1`` that is the number of micro-batches a stage holds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

from .schedules import (
    BACKWARD,
    FORWARD,
    RECV_ACT,
    RECV_GRAD,
    SEND_ACT,
    Action,
    build_schedule,
    global_chunk_index,
    message_tag,
)


class ScheduleError(RuntimeError):
    """A set of pipeline action lists is inconsistent (a bug in a schedule)."""


class PipelineDeadlockError(ScheduleError):
    """No stage can make progress while some still have actions left."""


@dataclass(frozen=True)
class StageTimeline:
    """What one stage did in a simulated step.

    Attributes:
        stage: rank in the pipeline group.
        finish_time: when its last compute ended (its own makespan).
        busy_time: total compute time.
        idle_time: pipeline makespan minus busy time (waiting before, between
            and after its computes).
        bubble_fraction: ``idle_time / makespan`` of the whole pipeline.
        peak_activations: most ``(microbatch, chunk)`` pairs held at once.
    """

    stage: int
    finish_time: Fraction
    busy_time: Fraction
    idle_time: Fraction
    bubble_fraction: Fraction
    peak_activations: int


@dataclass(frozen=True)
class PipelineSimulation:
    """Result of :func:`simulate_pipeline`.

    Attributes:
        makespan: time from the start of the step (0) to the last compute end.
        bubble_fraction: idle share of the whole pipeline,
            ``sum(idle_time) / (num_stages * makespan)``.
        stages: one :class:`StageTimeline` per stage.
    """

    makespan: Fraction
    bubble_fraction: Fraction
    stages: tuple[StageTimeline, ...]


class _StageState:
    """Progress of one stage through its action list."""

    def __init__(self, stage: int, actions: Sequence[Action]):
        self.stage = stage
        self.actions = actions
        self.position = 0
        self.clock = 0
        self.busy = 0
        # (kind, microbatch, chunk) of each posted, not yet consumed receive -> (peer, tag)
        self.posted: dict[tuple, tuple[int, int]] = {}
        self.forwarded: set[tuple[int, int]] = set()
        self.backwarded: set[tuple[int, int]] = set()
        self.held = 0
        self.peak_held = 0

    @property
    def done(self) -> bool:
        return self.position == len(self.actions)

    @property
    def next_action(self) -> Action:
        return self.actions[self.position]


class _Simulator:
    def __init__(self, stage_actions: Sequence[Sequence[Action]], virtual_stages: int,
                 forward_cost: Fraction, backward_cost: Fraction):
        self.p = len(stage_actions)
        self.v = virtual_stages
        self.num_chunks = self.p * self.v
        # Clocks count integer ticks of 1 / time_scale so that chunk costs add exactly and fast.
        self.time_scale = virtual_stages * math.lcm(forward_cost.denominator, backward_cost.denominator)
        self.cost = {FORWARD: int(forward_cost * self.time_scale) // virtual_stages,
                     BACKWARD: int(backward_cost * self.time_scale) // virtual_stages}
        self.stages = [_StageState(s, actions) for s, actions in enumerate(stage_actions)]
        # (sender, receiver, tag) -> (kind of the send, time it was sent)
        self.in_flight: dict[tuple[int, int, int], tuple] = {}

    def fail(self, state: _StageState, message: str) -> ScheduleError:
        return ScheduleError(
            f"stage {state.stage}, action {state.position} ({state.next_action}): {message}"
        )

    def expected_peer(self, state: _StageState, action: Action) -> int:
        g = global_chunk_index(state.stage, action.chunk, self.p)
        toward_next = action.kind in (SEND_ACT, RECV_GRAD)
        neighbour = g + 1 if toward_next else g - 1
        if not 0 <= neighbour < self.num_chunks:
            raise self.fail(state, f"global chunk {g} has no neighbour chunk {neighbour}")
        return neighbour % self.p

    def check_action(self, state: _StageState, action: Action) -> None:
        if not 0 <= action.chunk < self.v:
            raise self.fail(state, f"chunk out of range [0, {self.v})")
        if action.microbatch < 0:
            raise self.fail(state, "negative micro-batch index")
        if action.kind.is_compute:
            if action.peer is not None:
                raise self.fail(state, "a compute action has no peer")
        elif action.peer != self.expected_peer(state, action):
            raise self.fail(state, f"wrong peer, expected stage {self.expected_peer(state, action)}")

    def step(self, state: _StageState) -> bool:
        """Run the next action of ``state``; False if it must wait for a message."""
        action = state.next_action
        self.check_action(state, action)
        pair = (action.microbatch, action.chunk)
        if action.kind.is_recv:
            key = (action.kind, *pair)
            if key in state.posted:
                raise self.fail(state, "the same receive is posted twice")
            state.posted[key] = (action.peer, message_tag(action, state.stage, self.p, self.v))
        elif action.kind.is_send:
            produced = state.forwarded if action.kind is SEND_ACT else state.backwarded
            if pair not in produced:
                raise self.fail(state, "sends data that no earlier compute produced")
            key = (state.stage, action.peer, message_tag(action, state.stage, self.p, self.v))
            if key in self.in_flight:
                raise self.fail(state, "an earlier message with the same tag is still unreceived")
            self.in_flight[key] = (action.kind, state.clock)
        elif not self.run_compute(state, action, pair):
            return False
        state.position += 1
        return True

    def run_compute(self, state: _StageState, action: Action, pair: tuple[int, int]) -> bool:
        g = global_chunk_index(state.stage, action.chunk, self.p)
        if action.kind is FORWARD:
            if pair in state.forwarded:
                raise self.fail(state, "forward runs twice")
            needs = RECV_ACT if g > 0 else None
        else:
            if pair not in state.forwarded:
                raise self.fail(state, "backward runs before its forward")
            if pair in state.backwarded:
                raise self.fail(state, "backward runs twice")
            needs = RECV_GRAD if g < self.num_chunks - 1 else None
        start = state.clock
        if needs is not None:
            recv_key = (needs, *pair)
            if recv_key not in state.posted:
                raise self.fail(state, f"its input was never received (no {needs.name} posted)")
            peer, tag = state.posted[recv_key]
            msg_key = (peer, state.stage, tag)
            if msg_key not in self.in_flight:
                return False
            sent_kind, sent_at = self.in_flight.pop(msg_key)
            if sent_kind.carries_activation != needs.carries_activation:
                raise self.fail(state, f"{needs.name} matched a {sent_kind.name} message")
            del state.posted[recv_key]
            start = max(start, sent_at)
        state.clock = start + self.cost[action.kind]
        state.busy += self.cost[action.kind]
        if action.kind is FORWARD:
            state.forwarded.add(pair)
            state.held += 1
            state.peak_held = max(state.peak_held, state.held)
        else:
            state.backwarded.add(pair)
            state.held -= 1
        return True

    def run(self) -> PipelineSimulation:
        while not all(state.done for state in self.stages):
            progressed = False
            for state in self.stages:
                while not state.done and self.step(state):
                    progressed = True
            if not progressed:
                stuck = "; ".join(self.describe_wait(state) for state in self.stages if not state.done)
                raise PipelineDeadlockError(f"pipeline deadlock, no stage can progress: {stuck}")
        self.check_finished()
        makespan = max(state.clock for state in self.stages)
        if makespan == 0:
            raise ScheduleError("no stage runs any compute")
        total_idle = sum(makespan - state.busy for state in self.stages)
        return PipelineSimulation(
            makespan=Fraction(makespan, self.time_scale),
            bubble_fraction=Fraction(total_idle, self.p * makespan),
            stages=tuple(self.timeline(state, makespan) for state in self.stages),
        )

    def describe_wait(self, state: _StageState) -> str:
        """A stuck stage, its next action and the message that action waits for."""
        action = state.next_action
        needs = RECV_ACT if action.kind is FORWARD else RECV_GRAD
        peer, tag = state.posted[(needs, action.microbatch, action.chunk)]
        return (f"stage {state.stage} at action {state.position} {action} waits for "
                f"{needs.name} from stage {peer} (tag {tag})")

    def check_finished(self) -> None:
        for state in self.stages:
            missing = state.forwarded - state.backwarded
            if missing:
                raise ScheduleError(
                    f"stage {state.stage}: forward without backward for (microbatch, chunk) "
                    f"{sorted(missing)}"
                )
            if state.posted:
                raise ScheduleError(
                    f"stage {state.stage}: receives posted but never consumed: "
                    + ", ".join(f"{kind.name}(mb={mb}, chunk={chunk})"
                                for kind, mb, chunk in state.posted)
                )
        if self.in_flight:
            raise ScheduleError(
                f"messages sent but never received (sender, receiver, tag): {sorted(self.in_flight)}"
            )

    def timeline(self, state: _StageState, makespan: int) -> StageTimeline:
        idle = makespan - state.busy
        return StageTimeline(
            stage=state.stage,
            finish_time=Fraction(state.clock, self.time_scale),
            busy_time=Fraction(state.busy, self.time_scale),
            idle_time=Fraction(idle, self.time_scale),
            bubble_fraction=Fraction(idle, makespan),
            peak_activations=state.peak_held,
        )


def simulate_pipeline(stage_actions: Sequence[Sequence[Action]], virtual_stages: int = 1,
                      forward_cost: int | float | Fraction = 1,
                      backward_cost: int | float | Fraction = 1) -> PipelineSimulation:
    """Run every stage's action list with free communication and fixed compute costs.

    Args:
        stage_actions: the action list of each stage, indexed by stage.
        virtual_stages: chunks per rank ``v`` the lists were built for.
        forward_cost: time of one micro-batch's forward through a whole stage.
        backward_cost: time of one micro-batch's backward through a whole stage.

    Raises:
        PipelineDeadlockError: when the stages wait on each other forever.
        ScheduleError: when the lists break a message or dependency rule.
    """
    if not stage_actions:
        raise ValueError("stage_actions must hold the action list of at least one stage")
    if not isinstance(virtual_stages, int) or isinstance(virtual_stages, bool) or virtual_stages < 1:
        raise ValueError(f"virtual_stages must be a positive integer, got {virtual_stages!r}")
    for name, cost in (("forward_cost", forward_cost), ("backward_cost", backward_cost)):
        if Fraction(cost) <= 0:
            raise ValueError(f"{name} must be positive, got {cost!r}")
    return _Simulator(stage_actions, virtual_stages, Fraction(forward_cost),
                      Fraction(backward_cost)).run()


def simulate_schedule(name: str, num_stages: int, num_microbatches: int, virtual_stages: int = 1,
                      forward_cost: int | float | Fraction = 1,
                      backward_cost: int | float | Fraction = 1) -> PipelineSimulation:
    """Build the named schedule for every stage and simulate it.

    Args:
        name: one of :data:`~hvdllm.common.schedules.SCHEDULES`.
        num_stages: pipeline degree ``p``.
        num_microbatches: micro-batches per step ``m``.
        virtual_stages: chunks per rank ``v``.
        forward_cost: time of one micro-batch's forward through a whole stage.
        backward_cost: time of one micro-batch's backward through a whole stage.
    """
    stage_actions = [build_schedule(name, num_stages, num_microbatches, stage, virtual_stages)
                     for stage in range(num_stages)]
    return simulate_pipeline(stage_actions, virtual_stages, forward_cost, backward_cost)
