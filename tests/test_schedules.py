"""Tier 1: pipeline schedules and the pipeline simulator, no framework and no MPI.

The exhaustive tests cover every valid shape with p <= 8 stages, m <= 32
micro-batches and v <= 4 virtual stages:

* "gpipe" and "1f1b": every p and m (including m < p), v = 1;
* "interleaved": v in 2..4, p >= 2 and m divisible by p (its validity rule);
  v = 1 is checked to be the very same lists as "1f1b".

Each shape is built and simulated once (results are cached) and the tests
loop over the shapes, which is much faster than thousands of parametrized
cases.
"""
from collections import Counter
from fractions import Fraction
from functools import cache

import pytest

from hvdllm.common.pipeline_sim import (
    PipelineDeadlockError,
    ScheduleError,
    simulate_pipeline,
    simulate_schedule,
)
from hvdllm.common.schedules import (
    BACKWARD,
    FORWARD,
    RECV_ACT,
    RECV_GRAD,
    SCHEDULES,
    SEND_ACT,
    SEND_GRAD,
    Action,
    bubble_fraction_theory,
    build_schedule,
    chunk_location,
    global_chunk_index,
    max_message_tag,
    message_tag,
    pipeline_schedule_1f1b,
    pipeline_schedule_gpipe,
    pipeline_schedule_interleaved,
)

MAX_STAGES, MAX_MICROBATCHES, MAX_VIRTUAL = 8, 32, 4


def valid_shapes():
    """Every (name, p, m, v) the tests cover, as described in the module docstring."""
    for p in range(1, MAX_STAGES + 1):
        for m in range(1, MAX_MICROBATCHES + 1):
            yield "gpipe", p, m, 1
            yield "1f1b", p, m, 1
            if p >= 2 and m % p == 0:
                for v in range(2, MAX_VIRTUAL + 1):
                    yield "interleaved", p, m, v


@cache
def stage_lists(name, p, m, v):
    return tuple(tuple(build_schedule(name, p, m, s, v)) for s in range(p))


@cache
def simulation(name, p, m, v, forward_cost=1, backward_cost=1):
    return simulate_pipeline(stage_lists(name, p, m, v), v, forward_cost, backward_cost)


# -- exhaustive properties ------------------------------------------------------

def test_every_send_has_one_matching_receive():
    for name, p, m, v in valid_shapes():
        sends, recvs = Counter(), Counter()
        for stage, actions in enumerate(stage_lists(name, p, m, v)):
            for a in actions:
                if a.kind.is_send:
                    sends[stage, a.peer, message_tag(a, stage, p, v), a.kind.carries_activation] += 1
                elif a.kind.is_recv:
                    recvs[a.peer, stage, message_tag(a, stage, p, v), a.kind.carries_activation] += 1
        shape = (name, p, m, v)
        assert sends == recvs, shape
        # One activation and one gradient per micro-batch and chunk boundary, each its own tag.
        assert len(sends) == sum(sends.values()) == 2 * m * (p * v - 1), shape
        tags = [tag for _, _, tag, _ in sends]
        assert len(set(tags)) == len(tags), shape
        assert all(0 <= tag <= max_message_tag(p, m, v) for tag in tags), shape


def test_each_microbatch_and_chunk_runs_one_forward_then_one_backward():
    for name, p, m, v in valid_shapes():
        for stage, actions in enumerate(stage_lists(name, p, m, v)):
            forward_at = {}
            backward_at = {}
            for i, a in enumerate(actions):
                if a.kind.is_compute:
                    seen = forward_at if a.kind is FORWARD else backward_at
                    assert (a.microbatch, a.chunk) not in seen, (name, p, m, v, stage, a)
                    seen[a.microbatch, a.chunk] = i
            everything = {(mb, c) for mb in range(m) for c in range(v)}
            assert set(forward_at) == set(backward_at) == everything, (name, p, m, v, stage)
            assert all(forward_at[pair] < backward_at[pair] for pair in everything)


def test_receives_come_right_before_and_sends_right_after_their_compute():
    for name, p, m, v in valid_shapes():
        for actions in stage_lists(name, p, m, v):
            for i, a in enumerate(actions):
                if a.kind.is_recv:
                    compute, expected = actions[i + 1], FORWARD if a.kind is RECV_ACT else BACKWARD
                elif a.kind.is_send:
                    compute, expected = actions[i - 1], FORWARD if a.kind is SEND_ACT else BACKWARD
                else:
                    continue
                assert (compute.kind, compute.microbatch, compute.chunk) == (
                    expected, a.microbatch, a.chunk), (name, p, m, v, i)


def test_simulation_finishes_with_every_stage_equally_busy():
    for name, p, m, v in valid_shapes():
        result = simulation(name, p, m, v)
        for timeline in result.stages:
            assert timeline.busy_time == 2 * m, (name, p, m, v)  # forward + backward cost 1 each
            assert timeline.finish_time <= result.makespan
        assert max(t.finish_time for t in result.stages) == result.makespan


@pytest.mark.parametrize("forward_cost, backward_cost", [(1, 1), (1, 2), (3, 2)])
def test_bubble_of_gpipe_and_1f1b_is_p_minus_1_over_m_plus_p_minus_1(forward_cost, backward_cost):
    """Holds exactly for every p, m (also m < p) and any fixed forward/backward costs."""
    for name, p, m, v in valid_shapes():
        if name == "interleaved":
            continue
        result = simulation(name, p, m, v, forward_cost, backward_cost)
        expected = Fraction(p - 1, m + p - 1)
        assert result.bubble_fraction == expected, (name, p, m, forward_cost, backward_cost)
        assert abs(float(result.bubble_fraction) - bubble_fraction_theory(name, p, m)) < 1e-9
        assert result.makespan == (m + p - 1) * (forward_cost + backward_cost)
        assert all(t.bubble_fraction == expected for t in result.stages)


@pytest.mark.parametrize("forward_cost, backward_cost", [(1, 1), (1, 2), (3, 2)])
def test_interleaved_bubble_matches_megatron(forward_cost, backward_cost):
    """Every valid interleaved shape: v in 2..4, p in 2..8, m a multiple of p up to 32.

    The bubble is exactly (p - 1) / (v * m + p - 1) there, for these costs,
    including m == p.
    """
    for name, p, m, v in valid_shapes():
        if name != "interleaved":
            continue
        result = simulation(name, p, m, v, forward_cost, backward_cost)
        expected = Fraction(p - 1, v * m + p - 1)
        assert result.bubble_fraction == expected, (p, m, v, forward_cost, backward_cost)
        assert abs(float(result.bubble_fraction) - bubble_fraction_theory(name, p, m, v)) < 1e-9
        assert result.bubble_fraction < simulation("1f1b", p, m, 1).bubble_fraction


def test_held_activations():
    for name, p, m, v in valid_shapes():
        for stage, timeline in enumerate(simulation(name, p, m, v).stages):
            peak = timeline.peak_activations
            if name == "gpipe":
                assert peak == m
            elif name == "1f1b":
                assert peak == min(p - stage, m) <= p, (p, m, stage)
            else:
                # Counted per (microbatch, chunk): the warm-up forwards plus one.
                assert peak == min(2 * (p - stage - 1) + (v - 1) * p + 1, m * v), (p, m, v, stage)


def test_interleaved_with_one_virtual_stage_is_1f1b():
    for p in range(1, MAX_STAGES + 1):
        for m in range(1, MAX_MICROBATCHES + 1):
            for stage in range(p):
                assert (build_schedule("interleaved", p, m, stage, 1)
                        == pipeline_schedule_1f1b(p, m, stage))


# -- small cases written out by hand --------------------------------------------

def compute_order(actions):
    return [("F" if a.kind is FORWARD else "B") + str(a.microbatch) + (f"c{a.chunk}" if a.chunk else "")
            for a in actions if a.kind.is_compute]


def test_1f1b_example_lists():
    assert compute_order(pipeline_schedule_1f1b(4, 6, 0)) == [
        "F0", "F1", "F2", "F3", "B0", "F4", "B1", "F5", "B2", "B3", "B4", "B5"]
    assert compute_order(pipeline_schedule_1f1b(4, 6, 3)) == [
        "F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3", "F4", "B4", "F5", "B5"]
    assert pipeline_schedule_1f1b(2, 2, 1) == [
        Action(RECV_ACT, 0, 0, 0), Action(FORWARD, 0), Action(BACKWARD, 0), Action(SEND_GRAD, 0, 0, 0),
        Action(RECV_ACT, 1, 0, 0), Action(FORWARD, 1), Action(BACKWARD, 1), Action(SEND_GRAD, 1, 0, 0),
    ]


def test_gpipe_example_list():
    assert pipeline_schedule_gpipe(2, 2, 0) == [
        Action(FORWARD, 0), Action(SEND_ACT, 0, 0, 1), Action(FORWARD, 1), Action(SEND_ACT, 1, 0, 1),
        Action(RECV_GRAD, 0, 0, 1), Action(BACKWARD, 0), Action(RECV_GRAD, 1, 0, 1), Action(BACKWARD, 1),
    ]


def test_interleaved_example_lists():
    # p = 2, v = 2: stage 0 holds global chunks 0 and 2, stage 1 holds 1 and 3.
    assert compute_order(pipeline_schedule_interleaved(2, 4, 0, 2)) == [
        "F0", "F1", "F0c1", "F1c1", "F2", "B0c1", "F3", "B1c1", "F2c1", "B0", "F3c1", "B1",
        "B2c1", "B3c1", "B2", "B3"]
    assert compute_order(pipeline_schedule_interleaved(2, 4, 1, 2)) == [
        "F0", "F1", "F0c1", "B0c1", "F1c1", "B1c1", "F2", "B0", "F3", "B1", "F2c1", "B2c1",
        "F3c1", "B3c1", "B2", "B3"]
    # The last stage sends activations of its chunk 0 around to stage 0's chunk 1.
    stage1 = pipeline_schedule_interleaved(2, 2, 1, 2)
    assert Action(SEND_ACT, 0, 0, 0) in stage1 and Action(RECV_GRAD, 0, 0, 0) in stage1
    assert Action(SEND_ACT, 0, 1, 0) not in stage1  # global chunk 3 is the last one


def test_chunk_arithmetic_and_tags():
    assert global_chunk_index(stage=1, chunk=2, num_stages=4) == 9
    assert chunk_location(9, num_stages=4) == (1, 2)
    # The two ends of one message agree on its tag: activation of mb 3 from global chunk 1 to 2.
    send = Action(SEND_ACT, 3, 0, 2)  # stage 1, chunk 0 = global chunk 1
    recv = Action(RECV_ACT, 3, 0, 1)  # stage 2, chunk 0 = global chunk 2
    assert message_tag(send, 1, 4) == message_tag(recv, 2, 4) == 2 * (3 * 3 + 1)
    grad_send = Action(SEND_GRAD, 3, 0, 1)
    assert message_tag(grad_send, 2, 4) == message_tag(recv, 2, 4) + 1
    with pytest.raises(ValueError, match="not a send or receive"):
        message_tag(Action(FORWARD, 0), 0, 4)
    with pytest.raises(ValueError, match="crosses no chunk boundary"):
        message_tag(Action(RECV_ACT, 0, 0, 3), 0, 4)


# -- registry, theory and bad input ---------------------------------------------

def test_registry_and_theory():
    assert SCHEDULES == ("gpipe", "1f1b", "interleaved")
    assert build_schedule("gpipe", 3, 5, 1) == pipeline_schedule_gpipe(3, 5, 1)
    assert build_schedule("interleaved", 4, 8, 2, 3) == pipeline_schedule_interleaved(4, 8, 2, 3)
    assert bubble_fraction_theory("gpipe", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction_theory("1f1b", 1, 8) == 0
    assert bubble_fraction_theory("interleaved", 4, 8, 2) == pytest.approx(3 / 19)


@pytest.mark.parametrize("call, message", [
    (lambda: build_schedule("zigzag", 2, 2, 0), "unknown pipeline schedule 'zigzag'; valid names: gpipe, 1f1b, interleaved"),
    (lambda: bubble_fraction_theory("zigzag", 2, 2), "valid names: gpipe, 1f1b, interleaved"),
    (lambda: build_schedule("1f1b", 0, 2, 0), "num_stages must be a positive integer, got 0"),
    (lambda: build_schedule("1f1b", 2, 0, 0), "num_microbatches must be a positive integer, got 0"),
    (lambda: build_schedule("gpipe", 2, -3, 0), "num_microbatches must be a positive integer, got -3"),
    (lambda: build_schedule("1f1b", 2, 2, 2), r"stage=2 out of range \[0, 2\)"),
    (lambda: build_schedule("1f1b", 2, 2, -1), r"stage=-1 out of range \[0, 2\)"),
    (lambda: pipeline_schedule_1f1b(2, 2, 5), r"stage=5 out of range"),
    (lambda: build_schedule("interleaved", 2, 2, 0, 0), "virtual_stages must be a positive integer, got 0"),
    (lambda: build_schedule("1f1b", 2, 4, 0, 2), "'1f1b' schedule has one chunk per rank, got virtual_stages=2"),
    (lambda: build_schedule("gpipe", 2, 4, 0, 3), "'gpipe' schedule has one chunk per rank"),
    (lambda: build_schedule("interleaved", 4, 6, 0, 2),
     "needs num_microbatches divisible by num_stages, got num_microbatches=6 and num_stages=4"),
    (lambda: build_schedule("interleaved", 4, 2, 0, 2), "num_microbatches=2 and num_stages=4"),
    (lambda: pipeline_schedule_interleaved(1, 4, 0, 2), "needs at least 2 pipeline stages, got num_stages=1"),
    (lambda: build_schedule("gpipe", 2.0, 2, 0), "num_stages must be a positive integer, got 2.0"),
    (lambda: simulate_pipeline([]), "at least one stage"),
    (lambda: simulate_schedule("1f1b", 2, 2, backward_cost=0), "backward_cost must be positive"),
])
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- the simulator catches broken schedules -------------------------------------

def test_simulator_reports_deadlock_with_stuck_stages_and_actions():
    # Stage 0 waits for the gradient of mb 0 before it sends mb 1's activation,
    # but stage 1 runs forward 1 before backward 0: a cycle.
    stage0 = [Action(FORWARD, 0), Action(SEND_ACT, 0, 0, 1), Action(RECV_GRAD, 0, 0, 1),
              Action(BACKWARD, 0), Action(FORWARD, 1), Action(SEND_ACT, 1, 0, 1),
              Action(RECV_GRAD, 1, 0, 1), Action(BACKWARD, 1)]
    stage1 = [Action(RECV_ACT, 0, 0, 0), Action(FORWARD, 0), Action(RECV_ACT, 1, 0, 0),
              Action(FORWARD, 1), Action(BACKWARD, 1), Action(SEND_GRAD, 1, 0, 0),
              Action(BACKWARD, 0), Action(SEND_GRAD, 0, 0, 0)]
    with pytest.raises(PipelineDeadlockError) as info:
        simulate_pipeline([stage0, stage1])
    text = str(info.value)
    assert "stage 0 at action 3 BACKWARD(mb=0, chunk=0) waits for RECV_GRAD from stage 1" in text
    assert "stage 1 at action 3 FORWARD(mb=1, chunk=0) waits for RECV_ACT from stage 0" in text


def broken(stage, edit, name="1f1b", p=2, m=2):
    lists = [list(actions) for actions in stage_lists(name, p, m, 1)]
    edit(lists[stage])
    return lists


@pytest.mark.parametrize("lists, message", [
    (broken(1, lambda a: a.remove(Action(RECV_ACT, 0, 0, 0))), "no RECV_ACT posted"),
    (broken(0, lambda a: a.remove(Action(RECV_GRAD, 1, 0, 1))), "no RECV_GRAD posted"),
    (broken(1, lambda a: a.insert(0, Action(BACKWARD, 0))), "backward runs before its forward"),
    (broken(0, lambda a: a.insert(1, Action(FORWARD, 0))), "forward runs twice"),
    (broken(0, lambda a: a.insert(0, Action(SEND_ACT, 0, 0, 1))), "sends data that no earlier compute produced"),
    (broken(0, lambda a: a.insert(2, Action(SEND_ACT, 0, 0, 1))), "same tag is still unreceived"),
    (broken(1, lambda a: a.__setitem__(0, Action(RECV_ACT, 0, 0, 1)), p=3), "wrong peer, expected stage 0"),
    (broken(0, lambda a: a.insert(0, Action(RECV_ACT, 0, 0, 1))), "global chunk 0 has no neighbour chunk -1"),
    (broken(1, lambda a: a.append(Action(RECV_ACT, 5, 0, 0))), r"posted but never consumed: RECV_ACT\(mb=5"),
    (broken(0, lambda a: a.remove(Action(BACKWARD, 1)), "gpipe", p=1), "forward without backward"),
    (broken(0, lambda a: a.append(Action(FORWARD, 0, 1))), r"chunk out of range \[0, 1\)"),
])
def test_simulator_rejects_broken_lists(lists, message):
    with pytest.raises(ScheduleError, match=message):
        simulate_pipeline(lists)
