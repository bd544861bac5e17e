"""The simulated slow data-parallel link (hvdllm.common.link_throttle)."""
from __future__ import annotations

import pytest

from hvdllm.common import link_throttle
from hvdllm.common.errors import ConfigError
from hvdllm.common.link_throttle import ENV_VAR, LinkThrottle, parse_gbps


class FakeClock:
    def __init__(self):
        self.t = 100.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s


@pytest.fixture
def fresh_env(monkeypatch):
    link_throttle.reset()
    yield monkeypatch
    link_throttle.reset()


def test_off_when_unset(fresh_env):
    fresh_env.delenv(ENV_VAR, raising=False)
    assert not link_throttle.current().enabled
    assert link_throttle.clock() == 0.0
    assert link_throttle.settle(0.0, 10**12) == 0.0  # a terabyte, and no wait
    fresh_env.setenv(ENV_VAR, " ")
    link_throttle.reset()
    assert not link_throttle.current().enabled


def test_sleeps_bytes_over_bandwidth_minus_elapsed():
    clock = FakeClock()
    thr = LinkThrottle(1.0, sleep=clock.sleep, now=clock.now)  # 1 Gb/s = 125 MB/s
    start = thr.clock()
    clock.t += 0.010  # the real exchange took 10 ms
    slept = thr.settle(start, 12_500_000)  # 100 ms on the link
    assert slept == pytest.approx(0.090)
    assert clock.slept == [pytest.approx(0.090)]
    # A real exchange slower than the link: no sleep.
    start = thr.clock()
    clock.t += 0.5
    assert thr.settle(start, 12_500_000) == 0.0
    assert thr.settle(thr.clock(), 0) == 0.0
    assert len(clock.slept) == 1


def test_env_sets_speed_and_real_sleep(fresh_env):
    fresh_env.setenv(ENV_VAR, "0.08")  # 10 MB/s
    thr = link_throttle.current()
    assert thr.enabled and thr.bytes_per_sec == pytest.approx(1e7)
    import time
    t0 = time.perf_counter()
    link_throttle.settle(link_throttle.clock(), 200_000)  # 20 ms
    assert 0.019 <= time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("bad", ["fast", "0", "-1", "inf", "nan"])
def test_bad_value_is_one_line_error(bad):
    with pytest.raises(ConfigError, match=ENV_VAR) as err:
        parse_gbps(bad)
    assert "\n" not in str(err.value)


def test_bad_env_fails_every_rank_alike(fresh_env):
    fresh_env.setenv(ENV_VAR, "1Gb")
    with pytest.raises(ConfigError, match="got '1Gb'") as err:
        link_throttle.settle(link_throttle.clock(), 1000)
    assert getattr(err.value, "agreed", False)  # the CLI prints it as one line
