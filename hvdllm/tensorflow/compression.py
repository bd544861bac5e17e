"""Gradient compressors for TensorFlow: average gradients over a DP group, with fewer bytes.

The algorithms, state and byte counts of :mod:`hvdllm.torch.compression`,
on Horovod's TensorFlow collectives over the group's process set.  Each
compressor maps this rank's gradients to (an approximation of) their
average over the DP :class:`~hvdllm.common.comm.Group`; TensorFlow tensors
are immutable, so :meth:`GradientCompressor.reduce` returns new ones.

* ``none``: one fp32 allreduce (average) of all gradients in one buffer.
* ``fp16`` / ``bf16``: gradients are cast to the 16-bit type for the wire;
  an alltoall of 16-bit chunks (a reduce-scatter by hand) whose partial
  sums are taken in fp32, then an allgather of the 16-bit averages.  The
  bits travel as int16: Horovod's TensorFlow ops cannot reduce bfloat16.
* ``topk``: the largest-magnitude ``topk_ratio`` fraction of ``grad +
  residual`` is sent (values and indices); the rest stays in the residual
  for the next step (error feedback).  The result is the average of every
  rank's densified contribution.  All tensors' values and indices travel in
  one int32 allgather.
* ``powersgd``: rank-``r`` PowerSGD (Vogels et al., 2019) with error
  feedback and warm-started ``Q``; see :class:`PowerSGDCompressor`.

With a group of one rank the same arithmetic runs without communication.
:meth:`GradientCompressor.reduce` is called from eager code, between the
engine's traced graphs.  Each step of a compressor is one traced
``tf.function`` holding its local arithmetic and its Horovod collectives
(eager op-by-op dispatch would cost more than the arithmetic); the call is
a registered wait of the hang watchdog (:mod:`hvdllm.common.watchdog`).
Compressor state travels in and out of the graph as tensors.  Top-k's
sparsity warm-up changes ``k`` every step, so it runs eagerly until the
ratio settles.

Each compressor counts the bytes this rank sends (the ring model of
:mod:`hvdllm.common.compression`, the same counts as torch):
``last_step_bytes`` for the latest :meth:`GradientCompressor.reduce` call
and ``bytes_sent`` in total.  State (residuals, ``Q``, errors) is keyed by
the names passed to :meth:`GradientCompressor.reduce` (the engine passes
variable paths), so pass the same names every step.
"""
from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from ..common import watchdog
from ..common.comm import Group
from ..common.compression import (DEFAULT_POWERSGD_RANK, DEFAULT_TOPK_RATIO, FP32_BYTES,
                                  allgather_bytes, allreduce_bytes, check_compression,
                                  half_wire_bytes, index_bytes, matrix_shape,
                                  powersgd_compresses, powersgd_effective_rank, topk_count)
from .data_parallel import TracedFunction

HALF_DTYPES = {"fp16": tf.float16, "bf16": tf.bfloat16}


def powersgd_initial_q(seed: int, name: str, cols: int, rank: int) -> tf.Tensor:
    """PowerSGD's first ``Q`` (cols x rank, standard normal, float32) for tensor ``name``.

    A function of ``seed`` and ``name`` only, so every rank draws the same
    ``Q`` (numpy's generator: not the numbers torch draws).
    """
    rng = np.random.default_rng((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return tf.constant(rng.standard_normal((cols, rank)).astype(np.float32))


def _flat(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def _unflat(flat: tf.Tensor, like: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    sizes = [int(np.prod(t.shape)) for t in like]
    return [tf.reshape(part, t.shape) for part, t in zip(tf.split(flat, sizes), like)]


class GradientCompressor:
    """Averages gradients over ``group`` (this base class: exact fp32 average).

    Args:
        group: the data-parallel group; its ``process_set`` carries the traffic.
        hvd: the ``horovod.tensorflow`` module (unused when the group has one rank).
    """

    mode = "none"
    #: Steps taken (compressors with a schedule or warm-up count them).
    steps: int = 0
    #: Per-tensor state dicts of this compressor (attribute names), saved by name.
    _state_tables: tuple[str, ...] = ()

    def __init__(self, group: Group, hvd: Any):
        self.group = group
        self.hvd = hvd
        self.bytes_sent = 0
        self.last_step_bytes = 0
        self._graphs: dict[Any, TracedFunction] = {}

    @property
    def _world(self) -> int:
        return self.group.size

    def _op_name(self, name: str) -> str:
        return f"hvdllm.{self.mode}.{name}"

    def _run(self, key: Any, fn: Any, args: tuple, op: str, nbytes: int,
             traced: bool = True) -> Any:
        """``fn(*args)``, traced once per ``key`` (or eagerly), as a registered wait."""
        if traced:
            if key not in self._graphs:
                self._graphs[key] = TracedFunction(fn)
            fn = self._graphs[key]
        if self._world == 1:
            return fn(*args)
        with watchdog.current().waiting(op, self.group.kind, self.group.ranks, nbytes=nbytes):
            return fn(*args)

    def reduce(self, grads: Sequence[Any], names: Sequence[str]) -> list[tf.Tensor]:
        """Every gradient's (compressed) average over the group, in order.

        Args:
            grads: dense fp32 gradients, the same shapes in the same order on
                every rank and at every call.
            names: one unique name per tensor, stable across steps (state key).
        """
        if len(grads) != len(names) or len(set(names)) != len(names):
            raise ValueError("reduce needs one unique name per tensor")
        self.last_step_bytes = 0
        out = self._reduce([tf.convert_to_tensor(g, tf.float32) for g in grads], list(names)) \
            if grads else []
        self.bytes_sent += self.last_step_bytes
        return out

    def _count_allreduce(self, shapes: Sequence[Sequence[int]]) -> int:
        """Bytes this rank sends to allreduce fp32 tensors of ``shapes`` (added to the step's)."""
        nbytes = sum(allreduce_bytes(int(np.prod(s)), FP32_BYTES, self._world) for s in shapes)
        self.last_step_bytes += nbytes
        return nbytes

    def _allreduce_mean(self, tensors: Sequence[tf.Tensor], name: str) -> list[tf.Tensor]:
        """Graph code: the average of ``tensors`` over the group, as one fused allreduce."""
        if self._world == 1 or not tensors:
            return list(tensors)
        flat = self.hvd.allreduce(_flat(tensors), op=self.hvd.Average, name=self._op_name(name),
                                  process_set=self.group.process_set)
        return _unflat(flat, tensors)

    def _reduce(self, tensors: list[tf.Tensor], names: list[str]) -> list[tf.Tensor]:
        nbytes = self._count_allreduce([t.shape for t in tensors])
        return self._run("dense", lambda ts: self._allreduce_mean(ts, "grads"), (tensors,),
                         f"{type(self).__name__} gradient allreduce (TensorFlow graph)", nbytes)

    # -- checkpoints --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's state: ``steps`` and ``"TABLE/NAME"`` numpy arrays (error feedback, Q)."""
        out: dict[str, Any] = {"steps": int(self.steps)}
        for table in self._state_tables:
            for name, t in getattr(self, table).items():
                out[f"{table}/{name}"] = t.numpy().copy()
        return out

    def forget_nonfinite(self) -> int:
        """Drop state entries holding inf or NaN; those tensors start afresh next step.

        Call after an fp16 step that overflowed: the step is skipped, but the
        error feedback (and PowerSGD's Q) already took in the overflowing
        gradient and would spoil every later step.  Q is the same on every
        rank (it comes from allreduced values), so every rank drops alike and
        draws the same fresh Q.  Returns how many entries were dropped.
        """
        dropped = 0
        for table in self._state_tables:
            entries = getattr(self, table)
            for name in [n for n, t in entries.items() if not np.all(np.isfinite(t.numpy()))]:
                del entries[name]
                dropped += 1
        return dropped

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on the same rank of the same layout)."""
        self.steps = int(state.get("steps", 0))
        for table in self._state_tables:
            getattr(self, table).clear()
        for key, t in state.items():
            table, _, name = key.partition("/")
            if table in self._state_tables:
                getattr(self, table)[name] = tf.constant(np.asarray(t, np.float32))


class HalfPrecisionCompressor(GradientCompressor):
    """fp16 or bf16 on the wire, partial sums and average in fp32.

    Args:
        group: the data-parallel group.
        hvd: the ``horovod.tensorflow`` module.
        mode: "fp16" or "bf16".
    """

    def __init__(self, group: Group, hvd: Any, mode: str):
        super().__init__(group, hvd)
        self.mode = mode
        self.dtype = HALF_DTYPES[mode]

    def _reduce(self, tensors: list[tf.Tensor], names: list[str]) -> list[tf.Tensor]:
        numel = sum(int(np.prod(t.shape)) for t in tensors)
        nbytes = half_wire_bytes(numel, self._world)
        self.last_step_bytes += nbytes
        return self._run("half", self._half_graph, (tensors,),
                         f"{self.mode} gradient alltoall and allgather (TensorFlow graph)", nbytes)

    def _half_graph(self, tensors: list[tf.Tensor]) -> list[tf.Tensor]:
        world = self._world
        flat = _flat(tensors)
        numel = int(flat.shape[0])
        chunk = -(-numel // world)
        wire = tf.cast(tf.pad(flat, [[0, chunk * world - numel]]), self.dtype)
        if world == 1:
            avg = tf.cast(wire, tf.float32)
        else:
            # The bits travel as int16: Horovod moves them untouched, whatever the 16-bit type.
            received = self.hvd.alltoall(tf.bitcast(wire, tf.int16),
                                         name=self._op_name("scatter"),
                                         process_set=self.group.process_set)
            parts = tf.reshape(tf.cast(tf.bitcast(received, self.dtype), tf.float32),
                               [world, chunk])
            mine = tf.cast(tf.reduce_sum(parts, axis=0) / world, self.dtype)
            gathered = self.hvd.allgather(tf.bitcast(mine, tf.int16),
                                          name=self._op_name("gather"),
                                          process_set=self.group.process_set)
            avg = tf.cast(tf.bitcast(gathered, self.dtype), tf.float32)
        return _unflat(avg[:numel], tensors)


class TopKCompressor(GradientCompressor):
    """Top-k sparsification with error feedback.

    Per tensor: ``acc = grad + residual``; the ``k = topk_count(numel,
    ratio)`` entries of largest ``|acc|`` are sent, and ``residual`` becomes
    ``acc`` with those entries zeroed.  So ``sent + residual == grad + old
    residual`` exactly: nothing a rank computed is dropped, only delayed.

    With ``warmup_steps`` the fraction sent starts at 25% and shrinks
    geometrically to ``ratio`` over that many steps (Deep Gradient
    Compression's sparsity warm-up).

    Args:
        group: the data-parallel group.
        hvd: the ``horovod.tensorflow`` module.
        ratio: fraction of entries sent, in (0, 1].
        warmup_steps: steps of the sparsity warm-up (0 = none).
    """

    mode = "topk"

    def __init__(self, group: Group, hvd: Any, ratio: float = DEFAULT_TOPK_RATIO,
                 warmup_steps: int = 0):
        super().__init__(group, hvd)
        check_compression("topk", topk_ratio=ratio)
        self.ratio = float(ratio)
        self.warmup_steps = int(warmup_steps)
        self.steps = 0
        self.residuals: dict[str, tf.Tensor] = {}
        self._state_tables = ("residuals",)

    def current_ratio(self) -> float:
        """The fraction sent at this step (``ratio`` once the warm-up is over)."""
        start = max(self.ratio, 0.25)
        if self.steps >= self.warmup_steps:
            return self.ratio
        return start * (self.ratio / start) ** (self.steps / self.warmup_steps)

    def _reduce(self, tensors: list[tf.Tensor], names: list[str]) -> list[tf.Tensor]:
        world = self._world
        settled = self.steps >= self.warmup_steps
        ratio = self.current_ratio()
        self.steps += 1
        residuals = []
        for t, name in zip(tensors, names):
            n = int(np.prod(t.shape))
            residual = self.residuals.get(name)
            if residual is None:
                residual = tf.zeros([n], tf.float32)
            elif int(residual.shape[0]) != n:
                raise ValueError(f"top-k: gradient {name!r} changed size from "
                                 f"{int(residual.shape[0])} to {n}")
            residuals.append(residual)
        ks = tuple(topk_count(int(np.prod(t.shape)), ratio) for t in tensors)
        nbytes = sum(allgather_bytes(k, FP32_BYTES + index_bytes(int(np.prod(t.shape))), world)
                     for k, t in zip(ks, tensors))
        self.last_step_bytes += nbytes
        out, residuals = self._run(("topk", ks), lambda ts, rs: self._topk_graph(ts, rs, ks),
                                   (tensors, residuals),
                                   "top-k gradient allgather (TensorFlow graph)", nbytes,
                                   traced=settled)
        self.residuals.update(zip(names, residuals))
        return out

    def _topk_graph(self, tensors: list[tf.Tensor], residuals: list[tf.Tensor],
                    ks: tuple[int, ...]) -> tuple[list, list]:
        """Select, exchange and densify; returns the averages and the new residuals."""
        world = self._world
        words, index_lens, new_residuals = [], [], []
        for t, residual, k in zip(tensors, residuals, ks):
            acc = tf.reshape(t, [-1]) + residual
            n = int(acc.shape[0])
            index = tf.math.top_k(tf.abs(acc), k, sorted=False).indices
            values = tf.gather(acc, index)
            new_residuals.append(tf.tensor_scatter_nd_update(acc, index[:, None],
                                                             tf.zeros([k], tf.float32)))
            if index_bytes(n) == 4:
                index_words = index
            else:  # int64 indices travel as pairs of int32 words
                index_words = tf.reshape(tf.bitcast(tf.cast(index, tf.int64), tf.int32), [-1])
            words += [tf.bitcast(values, tf.int32), index_words]
            index_lens.append(int(index_words.shape[0]))
        wire = tf.concat(words, axis=0)  # values and indices of every tensor, as int32
        if world > 1:
            wire = self.hvd.allgather(wire, name=self._op_name("sparse"),
                                      process_set=self.group.process_set)
        per_rank = tf.reshape(wire, [world, -1])
        out, at = [], 0
        for t, k, index_len in zip(tensors, ks, index_lens):
            values = tf.bitcast(per_rank[:, at:at + k], tf.float32)
            index = per_rank[:, at + k:at + k + index_len]
            at += k + index_len
            if index_len != k:
                index = tf.bitcast(tf.reshape(index, [world, k, 2]), tf.int64)
            n = int(np.prod(t.shape))
            dense = tf.scatter_nd(tf.reshape(tf.cast(index, tf.int64), [-1, 1]),
                                  tf.reshape(values, [-1]), [n])
            out.append(tf.reshape(dense / world, t.shape))
        return out, new_residuals


class PowerSGDCompressor(GradientCompressor):
    """Rank-``r`` PowerSGD with error feedback and warm start (Vogels et al., 2019).

    For each gradient viewed as a matrix ``M`` (first axis by the rest):

    1. ``M = grad + error``;  ``P = M Q``;  average ``P`` over the group;
    2. orthonormalise the columns of ``P`` (reduced QR);
    3. ``Q = M^T P``;  average ``Q``;
    4. the result is ``P Q^T`` (identical on every rank);
       ``error = M - P Q^T`` stays local for the next step, and ``Q`` is
       kept as the next step's starting point (warm start).

    ``Q`` starts from :func:`powersgd_initial_q`, the same on every rank;
    an all-zero new ``Q`` never replaces the previous one.
    Tensors PowerSGD cannot shrink (1-D ones, and matrices whose factors
    would not be smaller) are averaged uncompressed, in the same allreduce
    as the ``P`` factors.  A requested rank above a matrix's smaller side
    is capped to it.  With ``warmup_steps``, the first that many steps
    average uncompressed.

    Args:
        group: the data-parallel group.
        hvd: the ``horovod.tensorflow`` module.
        rank: requested approximation rank (>= 1).
        seed: seed of the initial ``Q`` (same on every rank).
        warmup_steps: uncompressed steps before PowerSGD starts (0 = none).
    """

    mode = "powersgd"

    def __init__(self, group: Group, hvd: Any, rank: int = DEFAULT_POWERSGD_RANK, seed: int = 0,
                 warmup_steps: int = 0):
        super().__init__(group, hvd)
        check_compression("powersgd", powersgd_rank=rank)
        self.rank = rank
        self.seed = seed
        self.warmup_steps = int(warmup_steps)
        self.steps = 0
        self.errors: dict[str, tf.Tensor] = {}
        self.qs: dict[str, tf.Tensor] = {}
        self._state_tables = ("errors", "qs")

    def _reduce(self, tensors: list[tf.Tensor], names: list[str]) -> list[tf.Tensor]:
        self.steps += 1
        if self.steps <= self.warmup_steps:
            return super()._reduce(tensors, names)
        dense = tuple(i for i, t in enumerate(tensors)
                      if not powersgd_compresses(t.shape, self.rank))
        work = [i for i in range(len(tensors)) if i not in dense]
        errors, qs, p_shapes, q_shapes = [], [], [], []
        for i in work:
            t, name = tensors[i], names[i]
            rows, cols = matrix_shape(t.shape)
            r = powersgd_effective_rank(t.shape, self.rank)
            error = self.errors.get(name)
            q = self.qs.get(name)
            errors.append(tf.zeros([rows, cols], tf.float32) if error is None else error)
            qs.append(powersgd_initial_q(self.seed, name, cols, r) if q is None else q)
            p_shapes.append((rows, r))
            q_shapes.append((cols, r))
        # The uncompressed tensors ride along with the P factors: one allreduce, then Q's.
        nbytes = self._count_allreduce([tensors[i].shape for i in dense] + p_shapes)
        nbytes += self._count_allreduce(q_shapes)
        out, errors, qs = self._run(("powersgd", dense),
                                    lambda ts, es, qs: self._powersgd_graph(ts, es, qs, dense),
                                    (tensors, errors, qs),
                                    "PowerSGD allreduces of P and Q (TensorFlow graph)", nbytes)
        for i, error, q in zip(work, errors, qs):
            self.errors[names[i]], self.qs[names[i]] = error, q
        return out

    def _powersgd_graph(self, tensors: list[tf.Tensor], errors: list[tf.Tensor],
                        qs: list[tf.Tensor], dense: tuple[int, ...]) -> tuple[list, list, list]:
        """One PowerSGD step; returns the results, the new errors and the new Q's."""
        work = [i for i in range(len(tensors)) if i not in dense]
        ms = [tf.reshape(tensors[i], error.shape) + error for i, error in zip(work, errors)]
        averaged = self._allreduce_mean([tensors[i] for i in dense]
                                        + [tf.matmul(m, q) for m, q in zip(ms, qs)], "dense_p")
        out: list[Any] = [None] * len(tensors)
        for i, avg in zip(dense, averaged):
            out[i] = avg
        ps = [tf.linalg.qr(p, full_matrices=False)[0] for p in averaged[len(dense):]]
        new_qs = self._allreduce_mean([tf.matmul(m, p, transpose_a=True)
                                       for m, p in zip(ms, ps)], "q")
        new_errors, kept_qs = [], []
        for i, m, p, q, old_q in zip(work, ms, ps, new_qs, qs):
            approx = tf.matmul(p, q, transpose_b=True)
            new_errors.append(m - approx)
            # An all-zero gradient would leave Q = 0 and P = 0 from then on; keep
            # the old Q instead (Q is averaged, so every rank decides alike).
            kept_qs.append(tf.where(tf.reduce_any(q != 0.0), q, old_q))
            out[i] = tf.reshape(approx, tensors[i].shape)
        return out, new_errors, kept_qs


def make_compressor(mode: str, group: Group, hvd: Any, *, topk_ratio: float = DEFAULT_TOPK_RATIO,
                    powersgd_rank: int = DEFAULT_POWERSGD_RANK, seed: int = 0,
                    warmup_steps: int = 0) -> GradientCompressor:
    """The compressor for ``train.compression = mode``.

    Args:
        mode: one of :data:`hvdllm.common.compression.COMPRESSIONS`.
        group: the data-parallel group.
        hvd: the ``horovod.tensorflow`` module.
        topk_ratio: ``train.topk_ratio``.
        powersgd_rank: ``train.powersgd_rank``.
        seed: seed of PowerSGD's initial ``Q`` (use ``train.seed``).
        warmup_steps: ``train.compression_warmup_steps``.
    """
    check_compression(mode, topk_ratio, powersgd_rank)
    if mode in HALF_DTYPES:
        return HalfPrecisionCompressor(group, hvd, mode)
    if mode == "topk":
        return TopKCompressor(group, hvd, topk_ratio, warmup_steps)
    if mode == "powersgd":
        return PowerSGDCompressor(group, hvd, powersgd_rank, seed, warmup_steps)
    return GradientCompressor(group, hvd)
