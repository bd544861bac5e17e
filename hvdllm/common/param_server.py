"""A sharded parameter server with bounded staleness (Stale Synchronous Parallel).

``parallel.mode = "ps"``: the last ``parallel.ps_servers`` ranks are
servers; the others are dp x tp x pp workers.  Each worker replica (its
tp x pp ranks) computes gradients on its own slice of every global batch,
pushes them to the servers and pulls parameters back, over mpi4py
non-blocking point-to-point.  Servers and protocol are numpy only: a
server never imports torch or TensorFlow.

**Spaces and shards.**  A worker rank's parameters, flattened in its
model's order, form the *space* of its (tp, pp) coordinates; every
replica's rank at those coordinates shares it.  Each space is cut into
``S`` contiguous shards of (nearly) equal size, one per server, so every
server holds the same bytes.

**Clocks.**  Worker replica ``r`` computes the gradient of clock ``c``
(step ``c + 1``, its slice of global batch ``c + 1``) on parameters of some
version ``v`` (the number of clock updates applied).  A server applies the
update of clock ``c`` of a space when every replica has pushed clock ``c``:
the mean of their gradients, summed in replica order, through the
optimizer, at the learning rate of step ``c + 1``.  So with ``s = 0`` every
update is exactly the synchronous step.

**The bound.**  Before clock ``c`` a worker pulls parameters of version at
least ``c - s``: the servers answer when they have applied that many
updates, which needs every replica to have pushed clock ``c - s - 1``, that
is, to have reached clock ``c - s``.  The *staleness* of a gradient is
``c - v``; the servers record it per update, and it never exceeds ``s``.

**Stopping early (preemption).**  SIGTERM or SIGUSR1 on any rank stops the
run after a clock every replica finishes.  A worker (or server) that gets
the signal tells the first server; that server picks the stop clock ``C``,
the largest clock any worker has asked parameters for or pushed, and tells
the other servers.  A pull for a clock beyond ``C`` is answered "stop";
every worker has pushed up to ``C`` by then (it pushes a clock before it
pulls for the next), so every server applies the updates up to ``C`` and
saves version ``C + 1``; replica 0 writes the training checkpoint of it.

**Deadlines.**  Every wait is bounded: a server whose workers stop pushing
ends after ``parallel.timeout_sec`` with an error that names the workers
that are behind; a worker whose servers stop answering ends after twice
that, naming the servers (a server that waits for a late worker is not
silent by its own fault, and it reports first).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import CommTimeoutError, HvdllmError

TAG_HELLO = 7100
TAG_HEADER = 7101
TAG_DATA = 7102
TAG_REPLY = 7103
TAG_REPLY_DATA = 7104

# header: [kind, clock, space, version, loss, replica, size]
HELLO, PUSH, PULL, BYE, STATE, STOP, STOP_AT = 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0
_STATE_CLOCK = -1  # a waiting pull with this clock asks for the optimizer state too
HEADER = 7


class ParameterServerError(HvdllmError):
    """The parameter-server protocol saw something it cannot go on from."""


def shard_bounds(size: int, servers: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each server's shard of a space of ``size`` floats."""
    base, extra = divmod(size, servers)
    out, lo = [], 0
    for k in range(servers):
        hi = lo + base + (1 if k < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


@dataclass
class OptimizerSpec:
    """The optimizer the servers run: the same arithmetic as the sync engines'.

    AdamW: decoupled decay on the parameters with ``decay`` set (matrices);
    SGD: momentum, L2 decay added to the gradient of those parameters.
    """

    kind: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.9

    @classmethod
    def from_config(cls, t: Any) -> "OptimizerSpec":
        return cls(t.optimizer, t.beta1, t.beta2, t.eps, t.weight_decay, t.momentum)


@dataclass
class ShardState:
    """One server's shard of one space, with its optimizer state."""

    params: np.ndarray
    decay: np.ndarray  # bool per float
    spec: OptimizerSpec
    step: int = 0
    m: np.ndarray | None = None
    v: np.ndarray | None = None

    def apply(self, grad: np.ndarray, lr: float) -> None:
        """One optimizer step with the mean gradient ``grad`` (float32)."""
        s, p = self.spec, self.params
        self.step += 1
        f32 = np.float32
        if s.kind == "sgd":
            g = grad
            if s.weight_decay:
                g = grad + np.where(self.decay, f32(s.weight_decay) * p, f32(0))
            if self.m is None:
                self.m = g.astype(np.float32, copy=True)
            else:
                self.m *= f32(s.momentum)
                self.m += g
            p -= f32(lr) * self.m
            return
        if self.m is None:
            self.m = np.zeros_like(p)
            self.v = np.zeros_like(p)
        if s.weight_decay:
            p *= np.where(self.decay, f32(1.0 - lr * s.weight_decay), f32(1.0))
        self.m *= f32(s.beta1)
        self.m += f32(1.0 - s.beta1) * grad
        self.v *= f32(s.beta2)
        self.v += f32(1.0 - s.beta2) * grad * grad
        bc1 = 1.0 - s.beta1 ** self.step
        bc2 = 1.0 - s.beta2 ** self.step
        denom = np.sqrt(self.v) / f32(math.sqrt(bc2)) + f32(s.eps)
        p -= f32(lr / bc1) * (self.m / denom)


@dataclass
class _Space:
    state: ShardState
    version: int = 0
    # the last update (params after minus before), for "extrapolate"
    delta: np.ndarray | None = None
    # clock -> replica -> (gradient, loss, staleness)
    pending: dict[int, dict[int, tuple[np.ndarray, float, int]]] = field(default_factory=dict)


@dataclass
class UpdateRecord:
    """What a server logs per applied update of space 0."""

    clock: int
    loss: float
    lr: float
    staleness: list[int]
    time: float


class ParameterServer:
    """One server rank's loop.

    Args:
        comm: the world communicator.
        workers: world ranks of the workers, with ``coords(rank) -> (replica, space)``.
        replicas: worker replicas (dp).
        spaces: parameter spaces (tp x pp).
        index: this server's index among the servers.
        servers: number of servers.
        clocks: clocks (steps) each replica runs.
        lr: learning rate of step ``clock + 1``.
        spec: the optimizer.
        timeout: seconds any wait may last with nothing arriving.
        on_update: called with each applied update of space 0.
    """

    def __init__(self, comm: Any, workers: Sequence[int], coords: Callable[[int], tuple[int, int]],
                 replicas: int, spaces: int, index: int, servers: int, clocks: int,
                 lr: Callable[[int], float], spec: OptimizerSpec, timeout: float,
                 on_update: Callable[[UpdateRecord], None] | None = None,
                 first_clock: int = 0, save: Callable[[int, dict], None] | None = None,
                 save_every: int = 0, save_last: bool = False, extrapolate: bool = False,
                 stop_requested: Callable[[], bool] | None = None,
                 server_ranks: Sequence[int] | None = None):
        self.comm = comm
        self.workers = list(workers)
        self.coords = coords
        self.replicas = replicas
        self.n_spaces = spaces
        self.index = index
        self.servers = servers
        self.clocks = clocks
        self.lr = lr
        self.spec = spec
        self.timeout = timeout
        self.on_update = on_update
        self.first_clock = first_clock
        self.spaces: dict[int, _Space] = {}
        self.last_push: dict[int, int] = {w: first_clock - 1 for w in self.workers}
        self.updates: list[UpdateRecord] = []
        # (worker, space, min version, the clock it computes next)
        self._waiting_pulls: list[tuple[int, int, int, int]] = []
        self._sends: list[tuple[Any, Any]] = []
        self.save = save
        self.save_every = save_every
        self.save_last = save_last
        self.extrapolate = extrapolate
        self.stop_requested = stop_requested or (lambda: False)
        #: the last clock of a run stopped early (None: runs to ``clocks``)
        self.stop_clock: int | None = None
        self._told_first = False
        self._heard_first = index == 0  # the first server decides; the others hear it
        self._furthest = first_clock - 1  # the largest clock pulled for or pushed
        self._saved: set[tuple[int, int]] = set()  # (version, space) captured
        ranks = (list(server_ranks) if server_ranks is not None
                 else [max(self.workers) + 1 + k for k in range(servers)])
        self.first_server = ranks[0]
        self.other_servers = ranks[1:] if index == 0 else []
        self._captured: dict[int, dict[int, dict[str, np.ndarray]]] = {}
        self._start = time.monotonic()

    # -- set-up ------------------------------------------------------------
    def receive_spaces(self, states: dict[int, dict[str, np.ndarray]] | None = None) -> None:
        """Every worker says hello (its space's size and decay mask); the
        first replica's ranks send the initial parameters of this shard, unless
        ``states`` (a checkpoint's shards) gives them."""
        from mpi4py import MPI

        hello = np.empty(HEADER)
        sizes: dict[int, int] = {}
        for _ in self.workers:
            status = MPI.Status()
            self._wait([self.comm.Irecv(hello, source=MPI.ANY_SOURCE, tag=TAG_HELLO)],
                       "a worker's hello", status=status)
            src = status.Get_source()
            if hello[0] != HELLO:
                raise ParameterServerError(f"parameter server: expected a hello from rank "
                                           f"{src}, got message kind {hello[0]:g}")
            space, replica, size = int(hello[2]), int(hello[5]), int(hello[6])
            if sizes.setdefault(space, size) != size:
                raise ParameterServerError(f"parameter server: rank {src} has {size} parameters "
                                           f"in space {space}, another rank {sizes[space]}")
            lo, hi = shard_bounds(size, self.servers)[self.index]
            mask = np.empty(hi - lo, np.uint8)
            self._wait([self.comm.Irecv(mask, source=src, tag=TAG_DATA)], "a decay mask",
                       peer=src)
            if replica == 0:
                params = np.empty(hi - lo, np.float32)
                self._wait([self.comm.Irecv(params, source=src, tag=TAG_DATA)],
                           "initial parameters", peer=src)
                state = ShardState(params, mask.astype(bool), self.spec)
                if states is not None:
                    saved = states[space]
                    state.params[:] = saved["params"]
                    state.step = int(saved["step"])
                    if "m" in saved:
                        state.m = saved["m"].copy()
                    if "v" in saved:
                        state.v = saved["v"].copy()
                delta = None
                if states is not None and "delta" in states[space]:
                    delta = states[space]["delta"].copy()
                self.spaces[space] = _Space(state, version=self.first_clock, delta=delta)
        if len(self.spaces) != self.n_spaces:
            raise ParameterServerError(f"parameter server: {len(self.spaces)} spaces had a "
                                       f"first-replica rank, expected {self.n_spaces}")
        self._start = time.monotonic()  # the updates' clock starts with training

    # -- the loop ----------------------------------------------------------
    def serve(self) -> list[UpdateRecord]:
        """Answer pushes and pulls until every worker has said goodbye and every
        update is applied; return the updates of space 0."""
        from mpi4py import MPI

        header = np.empty(HEADER)
        done: set[int] = set()
        # A server other than the first also waits for the first's STOP_AT when
        # the workers' goodbyes say the run stopped early (messages from
        # different ranks may arrive in any order).
        while len(done) < len(self.workers) or (self.stop_clock is not None
                                                 and not self._heard_first):
            status = MPI.Status()
            req = self.comm.Irecv(header, source=MPI.ANY_SOURCE, tag=TAG_HEADER)
            self._wait([req], "a worker's push or pull", status=status, behind=True,
                       poll=self._check_signal)
            src = status.Get_source()
            kind = header[0]
            if kind == PUSH:
                self._push(src, header)
            elif kind == PULL:
                self._furthest = max(self._furthest, int(header[1]))
                self._waiting_pulls.append((src, int(header[2]), int(header[3]),
                                            int(header[1])))
            elif kind == STATE:
                self._waiting_pulls.append((src, int(header[2]), int(header[3]), _STATE_CLOCK))
            elif kind == BYE:
                done.add(src)
                if header[1] >= 0 and self.stop_clock is None:
                    self._set_stop(int(header[1]))  # the worker stopped at that clock
            elif kind == STOP:
                if self.index == 0:
                    self._decide_stop()
            elif kind == STOP_AT:
                self._heard_first = True
                if self.stop_clock is None:
                    self._set_stop(int(header[1]))
            else:
                raise ParameterServerError(f"parameter server: unknown message kind {kind:g} "
                                           f"from rank {src}")
            self._answer_pulls()
            self._reap_sends()
        self._finish_sends()
        end = self.clocks if self.stop_clock is None else self.stop_clock + 1
        for sid, space in self.spaces.items():
            if space.version != end:
                raise ParameterServerError(f"parameter server: space {sid} stopped at version "
                                           f"{space.version}, expected {end}")
        return self.updates

    # -- stopping early ----------------------------------------------------
    def _check_signal(self) -> None:
        """Between messages: act on this rank's own stop signal."""
        if self.stop_clock is not None or self._told_first or not self.stop_requested():
            return
        if self.index == 0:
            self._decide_stop()
        else:
            self._told_first = True
            head = np.array([STOP, 0, 0, 0, 0, -1, 0], np.float64)
            self._sends.append((self.comm.Isend(head, dest=self.first_server, tag=TAG_HEADER),
                                head))

    def _decide_stop(self) -> None:
        """(First server) the stop clock: the furthest clock any worker has reached."""
        if self.stop_clock is not None:
            return
        clock = min(max(self._furthest, min(s.version for s in self.spaces.values()) - 1),
                    self.clocks - 1)
        for dest in self.other_servers:
            head = np.array([STOP_AT, clock, 0, 0, 0, -1, 0], np.float64)
            self._sends.append((self.comm.Isend(head, dest=dest, tag=TAG_HEADER), head))
        self._set_stop(clock)

    def _set_stop(self, clock: int) -> None:
        self.stop_clock = clock
        for sid, space in self.spaces.items():
            self._maybe_save(sid, space)
        self._answer_pulls()

    def state_of(self, space: int) -> dict[str, np.ndarray]:
        """This server's shard of ``space`` and its optimizer state (for checkpoints)."""
        st = self.spaces[space].state
        out = {"params": st.params.copy(), "step": np.array(st.step)}
        if st.m is not None:
            out["m"] = st.m.copy()
        if st.v is not None:
            out["v"] = st.v.copy()
        if self.spaces[space].delta is not None:
            out["delta"] = self.spaces[space].delta.copy()
        return out

    def _push(self, src: int, header: np.ndarray) -> None:
        clock, sid, version, loss = int(header[1]), int(header[2]), int(header[3]), header[4]
        replica = int(header[5])
        space = self.spaces[sid]
        grad = np.empty_like(space.state.params)
        self._wait([self.comm.Irecv(grad, source=src, tag=TAG_DATA)],
                   f"the gradient of clock {clock}", peer=src)
        if clock < space.version or replica in space.pending.get(clock, {}):
            raise ParameterServerError(f"parameter server: rank {src} pushed clock {clock} "
                                       f"twice or after its update")
        space.pending.setdefault(clock, {})[replica] = (grad, float(loss), clock - version)
        self.last_push[src] = max(self.last_push[src], clock)
        self._furthest = max(self._furthest, clock)
        while (len(space.pending.get(space.version, {})) == self.replicas
               and (self.stop_clock is None or space.version <= self.stop_clock)):
            self._apply(sid, space)

    def _apply(self, sid: int, space: _Space) -> None:
        clock = space.version
        got = space.pending.pop(clock)
        total = got[0][0].copy()
        for r in range(1, self.replicas):
            total += got[r][0]
        total /= np.float32(self.replicas)
        lr = self.lr(clock + 1)
        before = space.state.params.copy() if self.extrapolate else None
        space.state.apply(total, lr)
        if before is not None:
            np.subtract(space.state.params, before, out=before)
            space.delta = before
        space.version += 1
        self._maybe_save(sid, space)
        if sid == 0:
            rec = UpdateRecord(clock, sum(got[r][1] for r in range(self.replicas)) / self.replicas,
                               lr, [got[r][2] for r in range(self.replicas)],
                               time.monotonic() - self._start)
            self.updates.append(rec)
            if self.on_update is not None:
                self.on_update(rec)

    def _maybe_save(self, sid: int, space: _Space) -> None:
        """Capture ``space`` when its version is due for a checkpoint; save the
        file when every space has reached that version."""
        v = space.version
        due = ((self.save_every and v % self.save_every == 0)
               or (self.save_last and v == self.clocks)
               or (self.stop_clock is not None and v == self.stop_clock + 1))
        if self.save is None or not due or (v, sid) in self._saved or v == self.first_clock:
            return
        self._saved.add((v, sid))
        got_v = self._captured.setdefault(v, {})
        got_v[sid] = self.state_of(sid)
        if len(got_v) == self.n_spaces:
            self.save(v, self._captured.pop(v))

    def _answer_pulls(self) -> None:
        keep = []
        stop = -1.0 if self.stop_clock is None else float(self.stop_clock)
        for src, sid, need, clock in self._waiting_pulls:
            space = self.spaces[sid]
            st = space.state
            if self.stop_clock is not None and clock > self.stop_clock:
                self._reply(src, [space.version, stop], st.params.copy())  # "stop"
            elif space.version >= need and clock == _STATE_CLOCK:
                self._reply(src, [space.version, st.step],
                            *((np.zeros_like(st.params) if value is None else value).copy()
                              for value in (st.params, st.m, st.v)))
            elif space.version >= need:
                data = st.params.copy()
                ahead = clock - space.version
                if self.extrapolate and ahead > 0 and space.delta is not None:
                    data += np.float32(ahead) * space.delta  # weight prediction
                self._reply(src, [space.version, stop], data)
            else:
                keep.append((src, sid, need, clock))
        self._waiting_pulls = keep

    def _reply(self, dest: int, head: list[float], *arrays: np.ndarray) -> None:
        """A reply header, then its arrays in order (one tag: they arrive in order)."""
        buf = np.array(head, np.float64)
        self._sends.append((self.comm.Isend(buf, dest=dest, tag=TAG_REPLY), buf))
        for data in arrays:
            self._sends.append((self.comm.Isend(data, dest=dest, tag=TAG_REPLY_DATA), data))

    def _reap_sends(self) -> None:
        self._sends = [(r, b) for r, b in self._sends if not r.Test()]

    def _finish_sends(self) -> None:
        if self._sends:
            self._wait([r for r, _ in self._sends], "the last replies to the workers")
            self._sends = []

    def _wait(self, requests: list, what: str, status: Any = None, peer: int | None = None,
              behind: bool = False, poll: Callable[[], None] | None = None) -> None:
        from mpi4py import MPI

        deadline = time.monotonic() + self.timeout
        pause = 1e-6
        while True:
            if poll is not None:
                poll()
            if len(requests) == 1 and status is not None:
                if requests[0].Test(status):
                    return
            elif MPI.Request.Testall(requests):
                return
            if time.monotonic() > deadline:
                for r in requests:
                    try:
                        r.Cancel()
                    except Exception:  # noqa: BLE001 - best effort before the error
                        pass
                me = self.comm.Get_rank()
                if peer is not None:
                    who = f"worker rank {peer}"
                elif behind:
                    slow = min(self.last_push.values())
                    ranks = sorted(w for w, c in self.last_push.items() if c == slow)
                    who = (f"worker rank(s) {', '.join(map(str, ranks))} (last pushed clock "
                           f"{slow})")
                else:
                    who = "the workers"
                raise CommTimeoutError(f"parameter server rank {me}: waited {self.timeout:g} s "
                                       f"for {what}; {who} stopped answering")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
            self._reap_sends()


class ServerClient:
    """A worker rank's side of the protocol.

    Args:
        comm: the world communicator.
        servers: world ranks of the servers, in server order.
        space: this rank's space (tp x pp coordinate index).
        replica: this rank's replica (dp coordinate).
        size: floats in this rank's parameters.
        timeout: ``parallel.timeout_sec``; a wait may last twice that.
    """

    def __init__(self, comm: Any, servers: Sequence[int], space: int, replica: int, size: int,
                 timeout: float):
        self.comm = comm
        self.servers = list(servers)
        self.space = space
        self.replica = replica
        self.size = size
        self.timeout = 2.0 * timeout
        self.bounds = shard_bounds(size, len(self.servers))
        self.version = 0
        #: set when a server answered "stop": the last clock of the run
        self.stop_clock: int | None = None
        self._told_first = False
        self._sends: list[tuple[Any, Any]] = []

    def request_stop(self) -> None:
        """Tell the first server that this rank got a stop signal (once)."""
        if not self._told_first:
            self._told_first = True
            self._send(self._header(STOP, 0, 0, 0.0), self.servers[0], TAG_HEADER)

    def hello(self, params: np.ndarray, decay: np.ndarray) -> None:
        """Introduce this rank to every server (with the initial parameters from replica 0)."""
        for srv, (lo, hi) in zip(self.servers, self.bounds):
            self._send(self._header(HELLO, 0, 0, 0.0), srv, TAG_HELLO)
            self._send(np.ascontiguousarray(decay[lo:hi], np.uint8), srv, TAG_DATA)
            if self.replica == 0:
                self._send(np.ascontiguousarray(params[lo:hi], np.float32), srv, TAG_DATA)
        self.flush()

    def push(self, clock: int, grad: np.ndarray, loss: float) -> None:
        """Send the gradient of ``clock``, computed on parameters of :attr:`version`."""
        self.flush()  # the previous push's buffers
        for srv, (lo, hi) in zip(self.servers, self.bounds):
            self._send(self._header(PUSH, clock, self.version, loss), srv, TAG_HEADER)
            self._send(np.ascontiguousarray(grad[lo:hi], np.float32), srv, TAG_DATA)

    def pull(self, need: int, out: np.ndarray, clock: int | None = None) -> int:
        """Fill ``out`` with parameters of version at least ``need`` (per shard),
        for computing clock ``clock`` (default ``need``; servers that
        extrapolate move stale parameters towards that clock); returns the
        oldest shard's version, which becomes :attr:`version`.  When the run
        is stopping before ``clock``, sets :attr:`stop_clock` instead (``out``
        then holds no particular version)."""
        versions = [np.empty(2) for _ in self.servers]
        reqs = []
        for srv, buf, (lo, hi) in zip(self.servers, versions, self.bounds):
            self._send(self._header(PULL, need if clock is None else clock, need, 0.0), srv,
                       TAG_HEADER)
            reqs.append(self.comm.Irecv(buf, source=srv, tag=TAG_REPLY))
            reqs.append(self.comm.Irecv(out[lo:hi], source=srv, tag=TAG_REPLY_DATA))
        self._wait(reqs, f"parameters of version >= {need}", pending=versions)
        stops = [int(v[1]) for v in versions if v[1] >= 0]
        if stops:
            self.stop_clock = min(stops)
        self.version = int(min(v[0] for v in versions))
        return self.version

    def stopping_before(self, clock: int) -> bool:
        """Whether the servers said the run stops before ``clock``."""
        return self.stop_clock is not None and clock > self.stop_clock

    def pull_state(self, need: int, params: np.ndarray) -> tuple[int, int, dict[str, np.ndarray]]:
        """Fill ``params`` with version ``need`` or newer and fetch the servers'
        optimizer state with it: (version, optimizer steps, {"m": first
        moment or momentum, "v": second moment}) over the whole space.  For
        the end of a run, when the parameters go into a training checkpoint."""
        heads = [np.empty(2) for _ in self.servers]
        slots = {"m": np.empty(self.size, np.float32), "v": np.empty(self.size, np.float32)}
        reqs = []
        for srv, head, (lo, hi) in zip(self.servers, heads, self.bounds):
            self._send(self._header(STATE, need, need, 0.0), srv, TAG_HEADER)
            reqs.append(self.comm.Irecv(head, source=srv, tag=TAG_REPLY))
            for out in (params, slots["m"], slots["v"]):
                # messages between two ranks on one tag arrive in the order sent
                reqs.append(self.comm.Irecv(out[lo:hi], source=srv, tag=TAG_REPLY_DATA))
        self._wait(reqs, f"the parameters and optimizer state of version >= {need}",
                   pending=heads, stride=4)
        versions = {int(h[0]) for h in heads}
        steps = {int(h[1]) for h in heads}
        if len(versions) != 1 or len(steps) != 1:
            raise ParameterServerError(f"parameter servers answered versions {sorted(versions)} "
                                       f"and optimizer steps {sorted(steps)}: they differ")
        self.version = versions.pop()
        return self.version, steps.pop(), slots

    def bye(self) -> None:
        """Goodbye to every server, with the clock the run stopped at (-1: none)."""
        self.flush()
        stop = -1 if self.stop_clock is None else self.stop_clock
        for srv in self.servers:
            self._send(self._header(BYE, stop, 0, 0.0), srv, TAG_HEADER)
        self.flush()

    def flush(self) -> None:
        if self._sends:
            self._wait([r for r, _ in self._sends], "the servers to take a message")
            self._sends = []

    def _header(self, kind: float, clock: int, version: int, loss: float) -> np.ndarray:
        return np.array([kind, clock, self.space, version, loss, self.replica, self.size],
                        np.float64)

    def _send(self, buf: np.ndarray, dest: int, tag: int) -> None:
        self._sends.append((self.comm.Isend(buf, dest=dest, tag=tag), buf))

    def _wait(self, requests: list, what: str, pending: list | None = None,
              stride: int = 2) -> None:
        from mpi4py import MPI

        deadline = time.monotonic() + self.timeout
        pause = 1e-6
        while not MPI.Request.Testall(requests):
            if time.monotonic() > deadline:
                me = self.comm.Get_rank()
                if pending is not None:
                    late = [srv for srv, r in zip(self.servers, requests[0::stride])
                            if not r.Test()]
                else:
                    late = self.servers
                raise CommTimeoutError(
                    f"worker rank {me}: waited {self.timeout:g} s for {what}; parameter server "
                    f"rank(s) {', '.join(map(str, late))} stopped answering")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)


# -- checkpoints ---------------------------------------------------------------
PS_CHECKPOINTS = "ps_checkpoints"


class ShardWriter:
    """Writes a server's checkpoints on a thread of their own, so the serving
    loop only copies its shards (the workers are not held up by the disk).

    One write is in flight at a time: :meth:`submit` waits for the previous
    one.  A failed write raises :class:`ParameterServerError` at the next
    :meth:`submit` or at :meth:`close`.  The first server (``index`` 0)
    then removes the checkpoints older than the newest ``keep`` that every
    server finished (``keep`` 0 keeps all).
    """

    def __init__(self, root: Any, index: int, servers: int, keep: int):
        self.root, self.index, self.servers, self.keep = root, index, servers, keep
        self._thread: Any = None
        self._error: BaseException | None = None

    def submit(self, step: int, spaces: dict[int, dict[str, np.ndarray]]) -> None:
        import threading

        self._join()
        self._thread = threading.Thread(target=self._write, args=(step, spaces),
                                        name=f"ps-checkpoint-{step}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Wait for the last write; raise if any failed."""
        self._join()

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise ParameterServerError(f"parameter server {self.index}: writing its checkpoint "
                                       f"failed: {error}") from error

    def _write(self, step: int, spaces: dict[int, dict[str, np.ndarray]]) -> None:
        try:
            save_shards(self.root, step, self.index, self.servers, spaces)
            if self.index == 0 and self.keep > 0:
                prune_shards(self.root, self.servers, self.keep)
        except BaseException as exc:  # noqa: BLE001 - reported by _join
            self._error = exc


def save_shards(root: Any, step: int, index: int, servers: int,
                spaces: dict[int, dict[str, np.ndarray]]) -> None:
    """Write one server's shards of every space after ``step`` updates (atomically)."""
    import json
    import os
    from pathlib import Path

    folder = Path(root) / PS_CHECKPOINTS / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {f"{sid}.{key}": value for sid, state in spaces.items()
              for key, value in state.items()}
    tmp = folder / f".server-{index}.npz.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / f"server-{index}.npz")
    meta = folder / "meta.json"
    if index == 0 and not meta.exists():
        tmp_meta = folder / ".meta.json.tmp"
        tmp_meta.write_text(json.dumps({"step": step, "servers": servers}))
        os.replace(tmp_meta, meta)


def newest_complete(root: Any, servers: int, limit: int) -> int:
    """The newest step <= ``limit`` whose every server file is written (0: none)."""
    from pathlib import Path

    base = Path(root) / PS_CHECKPOINTS
    best = 0
    if not base.is_dir():
        return 0
    for folder in base.glob("step-*"):
        try:
            step = int(folder.name.split("-", 1)[1])
        except ValueError:
            continue
        if step <= limit and step > best and all(
                (folder / f"server-{k}.npz").is_file() for k in range(servers)):
            best = step
    return best


def prune_shards(root: Any, servers: int, keep: int) -> list[int]:
    """Remove every checkpoint (complete or not) older than the ``keep``-th newest
    complete one; return the removed steps."""
    import shutil
    from pathlib import Path

    base = Path(root) / PS_CHECKPOINTS
    steps: dict[int, Path] = {}
    for folder in base.glob("step-*"):
        try:
            steps[int(folder.name.split("-", 1)[1])] = folder
        except ValueError:
            continue
    complete = sorted((s for s, f in steps.items()
                       if all((f / f"server-{k}.npz").is_file() for k in range(servers))),
                      reverse=True)
    if len(complete) <= keep:
        return []
    oldest_kept = complete[keep - 1]
    removed = sorted(s for s in steps if s < oldest_kept)
    for s in removed:
        shutil.rmtree(steps[s], ignore_errors=True)
    return removed


def load_shards(root: Any, step: int, index: int) -> dict[int, dict[str, np.ndarray]]:
    """One server's shards written by :func:`save_shards`."""
    from pathlib import Path

    path = Path(root) / PS_CHECKPOINTS / f"step-{step:08d}" / f"server-{index}.npz"
    out: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for key in data.files:
            sid, name = key.split(".", 1)
            out.setdefault(int(sid), {})[name] = data[key]
    return out
