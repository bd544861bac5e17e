"""Gradient compressors: average gradients over a data-parallel group, with fewer bytes.

Every compressor replaces each gradient, in place, by (an approximation
of) its average over the DP :class:`~hvdllm.common.comm.Group`, using
Horovod collectives on the group's process set.  Horovod ops end in an
error at the stall deadline hvdllm configures (see
:func:`hvdllm.common.launch.configure_horovod_env`), so no wait is endless.

* ``none``: one grouped fp32 allreduce (average).
* ``fp16`` / ``bf16``: gradients are cast to the 16-bit type for the wire.
  The reduction is an alltoall of 16-bit chunks (a reduce-scatter by hand)
  whose partial sums are taken in fp32, then an allgather of the 16-bit
  averages.  That sends the same bytes as a 16-bit ring allreduce, sums in
  fp32 (more accurate than summing in 16 bits) and does not need Horovod to
  reduce 16-bit floats (Horovod 0.28 cannot reduce bfloat16 at all): only
  int16 alltoall and allgather, which :func:`horovod_supports` checks at
  construction, failing with a clear error if they are missing.
* ``topk``: the largest-magnitude ``topk_ratio`` fraction of ``grad +
  residual`` is sent (values and indices, one grouped allgather); the rest
  stays in the residual for the next step (error feedback).  The result is
  the average of every rank's densified contribution.
* ``powersgd``: rank-``r`` PowerSGD (Vogels et al., 2019) with error
  feedback and warm-started ``Q``; see :class:`PowerSGDCompressor`.

With a group of one rank the same arithmetic runs without communication,
so results do not depend on whether a job is data-parallel.

Each compressor counts the bytes this rank sends (by the ring model of
:mod:`hvdllm.common.compression`): ``last_step_bytes`` for the latest
:meth:`GradientCompressor.reduce_` call and ``bytes_sent`` in total.

How the engine uses it (``train.compression`` other than "none"): build
one compressor with :func:`make_compressor` over ``groups.dp``; do not
attach :class:`~hvdllm.torch.data_parallel.GradientSync` (its overlapped
allreduce stays the path for "none"); after the last micro-batch's
backward call ``compressor.reduce_grads_(model.named_parameters())`` and
then clip / step; log ``compressor.last_step_bytes`` as ``comm_bytes``.
Compressor state (residuals, ``Q``) is keyed by parameter name, so pass
the same names every step.
"""
from __future__ import annotations

import zlib
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..common.comm import Group
from ..common.compression import (DEFAULT_POWERSGD_RANK, DEFAULT_TOPK_RATIO, FP32_BYTES,
                                  allgather_bytes, allreduce_bytes, check_compression,
                                  half_wire_bytes, matrix_shape, powersgd_compresses,
                                  powersgd_effective_rank, topk_count)
from ..common.errors import EnvironmentSetupError
from ..common.watchdog import wait_horovod

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def horovod_supports(hvd: Any, op: str, dtype: torch.dtype, device: str = "cpu") -> bool:
    """Whether this Horovod build can run collective ``op`` on ``dtype`` tensors on ``device``.

    Horovod registers one C entry point per collective and tensor type and
    refuses other types before any communication, so this needs none.

    Args:
        hvd: the ``horovod.torch`` module.
        op: "allreduce", "allgather", "alltoall" or "reducescatter".
        dtype: tensor dtype.
        device: "cpu" or "cuda".
    """
    lib = getattr(getattr(hvd, "mpi_ops", None), "mpi_lib", None)
    if lib is None:
        raise EnvironmentSetupError("cannot inspect the Horovod build: horovod.torch.mpi_ops "
                                    "has no mpi_lib; is Horovod built with PyTorch support?")
    type_name = torch.empty(0, dtype=dtype).type()  # e.g. torch.FloatTensor
    if device != "cpu":
        type_name = type_name.replace("torch.", f"torch.{device}.", 1)
    return hasattr(lib, f"horovod_torch_{op}_async_" + type_name.replace(".", "_"))


def require_horovod_support(hvd: Any, needs: Sequence[tuple[str, torch.dtype]], device: str,
                            what: str) -> None:
    """Raise :class:`EnvironmentSetupError` naming ``what`` unless Horovod has all ``needs``.

    Args:
        hvd: the ``horovod.torch`` module.
        needs: (collective, dtype) pairs, as for :func:`horovod_supports`.
        device: "cpu" or "cuda".
        what: the feature that needs them, for the message.
    """
    missing = [f"{op} of {str(dtype).replace('torch.', '')}" for op, dtype in needs
               if not horovod_supports(hvd, op, dtype, device)]
    if missing:
        raise EnvironmentSetupError(f"{what} needs Horovod {' and '.join(missing)} tensors on "
                                    f"{device}, which this Horovod build does not support")


def powersgd_initial_q(seed: int, name: str, cols: int, rank: int) -> torch.Tensor:
    """PowerSGD's first ``Q`` (cols x rank, standard normal) for tensor ``name``.

    A function of ``seed`` and ``name`` only, so every rank draws the same ``Q``.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(cols, rank, generator=gen)


class GradientCompressor:
    """Averages gradients over ``group`` (this base class: exact fp32 average).

    Args:
        group: the data-parallel group; its ``process_set`` carries the traffic.
        hvd: the ``horovod.torch`` module (unused when the group has one rank).
    """

    mode = "none"
    #: Steps taken (compressors with a schedule or warm-up count them).
    steps: int = 0

    def __init__(self, group: Group, hvd: Any):
        self.group = group
        self.hvd = hvd
        self.bytes_sent = 0
        self.last_step_bytes = 0

    @property
    def _world(self) -> int:
        return self.group.size

    def _op_name(self, name: str) -> str:
        return f"hvdllm.{self.mode}.{name}"

    def reduce_(self, tensors: Sequence[torch.Tensor], names: Sequence[str]) -> None:
        """Replace every tensor in place by its (compressed) average over the group.

        Args:
            tensors: fp32 gradients, the same shapes in the same order on every rank.
            names: one unique name per tensor, stable across steps (state key).
        """
        if len(tensors) != len(names) or len(set(names)) != len(names):
            raise ValueError("reduce_ needs one unique name per tensor")
        self.last_step_bytes = 0
        if tensors:
            with torch.no_grad():
                self._reduce(list(tensors), list(names))
        self.bytes_sent += self.last_step_bytes

    def reduce_grads_(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        """Average the gradients of ``named_parameters``; a missing gradient counts as zeros."""
        params = [(n, p) for n, p in named_parameters if p.requires_grad]
        for _, p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.reduce_([p.grad for _, p in params], [n for n, _ in params])

    def _allreduce_mean(self, tensors: list[torch.Tensor], name: str) -> Any:
        """Start an in-place average of ``tensors``; returns a handle for :meth:`_wait`."""
        self.last_step_bytes += sum(allreduce_bytes(t.numel(), t.element_size(), self._world)
                                    for t in tensors)
        if self._world == 1:
            return None
        return self.hvd.grouped_allreduce_async_(tensors, op=self.hvd.Average,
                                                 name=self._op_name(name),
                                                 process_set=self.group.process_set)

    def _wait(self, handle: Any) -> Any:
        return None if handle is None else wait_horovod(
            self.hvd, handle, f"{type(self).__name__} gradient allreduce", self.group)

    def _reduce(self, tensors: list[torch.Tensor], names: list[str]) -> None:
        self._wait(self._allreduce_mean(tensors, "grads"))

    # -- checkpoints --------------------------------------------------------
    #: Per-tensor state dicts of this compressor (attribute names), saved by name.
    _state_tables: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: ``steps`` and ``"TABLE/NAME"`` tensors (error feedback, Q)."""
        out: dict[str, Any] = {"steps": int(self.steps)}
        for table in self._state_tables:
            for name, t in getattr(self, table).items():
                out[f"{table}/{name}"] = t.detach().clone()
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
            for name in [n for n, t in entries.items() if not np.all(np.isfinite(t.detach().cpu().numpy()))]:
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
                getattr(self, table)[name] = torch.as_tensor(t).clone()


class HalfPrecisionCompressor(GradientCompressor):
    """fp16 or bf16 on the wire, partial sums and average in fp32.

    Args:
        group: the data-parallel group.
        hvd: the ``horovod.torch`` module.
        mode: "fp16" or "bf16".
        device: device of the gradients ("cpu" or "cuda").
    """

    def __init__(self, group: Group, hvd: Any, mode: str, device: str = "cpu"):
        super().__init__(group, hvd)
        self.mode = mode
        self.dtype = HALF_DTYPES[mode]
        if group.size > 1:
            require_horovod_support(hvd, [("alltoall", torch.int16), ("allgather", torch.int16)],
                                    device, f"train.compression = {mode!r}")

    def _reduce(self, tensors: list[torch.Tensor], names: list[str]) -> None:
        world = self._world
        numel = sum(t.numel() for t in tensors)
        chunk = -(-numel // world)
        wire = torch.zeros(chunk * world, dtype=self.dtype, device=tensors[0].device)
        offset = 0
        for t in tensors:
            wire[offset:offset + t.numel()].copy_(t.reshape(-1))
            offset += t.numel()
        self.last_step_bytes += half_wire_bytes(numel, world)
        if world == 1:
            avg = wire.float()
        else:
            # The bits travel as int16: Horovod moves them untouched, whatever the 16-bit type.
            handle = self.hvd.alltoall_async(wire.view(torch.int16), name=self._op_name("scatter"),
                                             process_set=self.group.process_set)
            received, _ = wait_horovod(self.hvd, handle, f"{self.mode} gradient alltoall",
                                       self.group, wire.numel() * wire.element_size())
            parts = received.view(self.dtype).float().view(world, chunk)
            mine = (parts.sum(0) / world).to(self.dtype)
            handle = self.hvd.allgather_async(mine.view(torch.int16), name=self._op_name("gather"),
                                              process_set=self.group.process_set)
            avg = wait_horovod(self.hvd, handle, f"{self.mode} gradient allgather", self.group,
                               mine.numel() * mine.element_size()).view(self.dtype).float()
        offset = 0
        for t in tensors:
            t.copy_(avg[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


class TopKCompressor(GradientCompressor):
    """Top-k sparsification with error feedback.

    Per tensor: ``acc = grad + residual``; the ``k = topk_count(numel,
    ratio)`` entries of largest ``|acc|`` are sent, and ``residual`` becomes
    ``acc`` with those entries zeroed.  So ``sent + residual == grad + old
    residual`` exactly, and nothing a rank computed is ever dropped, only
    delayed.

    With ``warmup_steps`` the fraction sent starts at 25% and shrinks
    geometrically to ``ratio`` over that many steps (the sparsity warm-up of
    Deep Gradient Compression, Lin et al. 2018): early gradients change
    fastest, and a residual built from them would otherwise lag for long.

    Args:
        group: the data-parallel group.
        hvd: the ``horovod.torch`` module.
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
        self.residuals: dict[str, torch.Tensor] = {}
        self._state_tables = ("residuals",)

    def current_ratio(self) -> float:
        """The fraction sent at this step (``ratio`` once the warm-up is over)."""
        start = max(self.ratio, 0.25)
        if self.steps >= self.warmup_steps:
            return self.ratio
        return start * (self.ratio / start) ** (self.steps / self.warmup_steps)

    def _reduce(self, tensors: list[torch.Tensor], names: list[str]) -> None:
        world = self._world
        ratio = self.current_ratio()
        self.steps += 1
        pending = []
        for t, name in zip(tensors, names):
            acc = t.reshape(-1).float().clone()
            residual = self.residuals.get(name)
            if residual is not None:
                if residual.numel() != acc.numel():
                    raise ValueError(f"top-k: gradient {name!r} changed size from "
                                     f"{residual.numel()} to {acc.numel()}")
                acc += residual
            k = topk_count(acc.numel(), ratio)
            index = torch.topk(acc.abs(), k, sorted=False).indices
            values = acc[index]
            acc[index] = 0.0
            self.residuals[name] = acc
            index_dtype = torch.int32 if acc.numel() < 2**31 else torch.int64
            index = index.to(index_dtype)
            self.last_step_bytes += allgather_bytes(k, FP32_BYTES + index.element_size(), world)
            if world == 1:
                pending.append((t, (values, index)))
            else:
                pending.append((t, self.hvd.grouped_allgather_async(
                    [values, index], name=self._op_name(name), process_set=self.group.process_set)))
        for t, handle in pending:
            values, index = handle if world == 1 else wait_horovod(
                self.hvd, handle, "top-k gradient allgather", self.group)
            dense = torch.zeros(t.numel(), dtype=torch.float32, device=t.device)
            dense.index_add_(0, index.long(), values)
            t.copy_((dense / world).view_as(t))


class PowerSGDCompressor(GradientCompressor):
    """Rank-``r`` PowerSGD with error feedback and warm start (Vogels et al., 2019).

    For each gradient viewed as a matrix ``M`` (first axis by the rest):

    1. ``M = grad + error``;  ``P = M Q``;  average ``P`` over the group;
    2. orthonormalise the columns of ``P`` (reduced QR);
    3. ``Q = M^T P``;  average ``Q``;
    4. the result is ``P Q^T`` (identical on every rank);
       ``error = M - P Q^T`` stays local for the next step, and ``Q`` is
       kept as the next step's starting point (warm start).

    ``Q`` starts from a normal draw seeded by ``seed`` and the tensor's
    name, so every rank starts from the same ``Q``.  Tensors that PowerSGD
    cannot shrink (1-D ones, and matrices whose factors would not be
    smaller, see :func:`hvdllm.common.compression.powersgd_compresses`)
    are averaged uncompressed in one grouped allreduce.  If a rank's
    requested rank exceeds a matrix's smaller side, the smaller side is used.

    With ``warmup_steps``, the first that many steps average uncompressed
    (as ``start_powerSGD_iter`` does in PyTorch's PowerSGD hook): the
    gradients of the first steps change too fast for a low-rank
    approximation with a warm-started ``Q`` to follow.

    Args:
        group: the data-parallel group.
        hvd: the ``horovod.torch`` module.
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
        self.errors: dict[str, torch.Tensor] = {}
        self.qs: dict[str, torch.Tensor] = {}
        self._state_tables = ("errors", "qs")

    def _reduce(self, tensors: list[torch.Tensor], names: list[str]) -> None:
        self.steps += 1
        if self.steps <= self.warmup_steps:
            super()._reduce(tensors, names)
            return
        dense = [t for t in tensors if not powersgd_compresses(t.shape, self.rank)]
        dense_handle = self._allreduce_mean(dense, "dense") if dense else None
        work = []
        for t, name in zip(tensors, names):
            if not powersgd_compresses(t.shape, self.rank):
                continue
            rows, cols = matrix_shape(t.shape)
            r = powersgd_effective_rank(t.shape, self.rank)
            m = t.reshape(rows, cols).float()
            error = self.errors.get(name)
            m = m + error if error is not None else m.clone()
            q = self.qs.get(name)
            if q is None:
                q = powersgd_initial_q(self.seed, name, cols, r).to(m.device)
            work.append((t, name, m, m @ q))
        if work:
            self._wait(self._allreduce_mean([p for *_, p in work], "p"))
            ps = [torch.linalg.qr(p, mode="reduced").Q for *_, p in work]
            qs = [m.T @ p for (_, _, m, _), p in zip(work, ps)]
            self._wait(self._allreduce_mean(qs, "q"))
            for (t, name, m, _), p, q in zip(work, ps, qs):
                approx = p @ q.T
                self.errors[name] = m - approx
                # An all-zero gradient would leave Q = 0 and P = 0 from then on; keep
                # the old Q instead (Q is averaged, so every rank decides alike).
                if name not in self.qs or bool(q.any()):
                    self.qs[name] = q
                t.copy_(approx.view_as(t))
        self._wait(dense_handle)


def make_compressor(mode: str, group: Group, hvd: Any, *, topk_ratio: float = DEFAULT_TOPK_RATIO,
                    powersgd_rank: int = DEFAULT_POWERSGD_RANK, seed: int = 0,
                    device: str = "cpu", warmup_steps: int = 0,
                    target: str = "gradient") -> GradientCompressor:
    """The compressor for ``train.compression = mode``.

    Args:
        mode: one of :data:`hvdllm.common.compression.COMPRESSIONS`.
        group: the data-parallel group.
        hvd: the ``horovod.torch`` module.
        topk_ratio: ``train.topk_ratio``.
        powersgd_rank: ``train.powersgd_rank``.
        seed: seed of PowerSGD's initial ``Q`` (use ``train.seed``).
        device: device of the gradients.
        warmup_steps: ``train.compression_warmup_steps``.
        target: ``train.compression_target``: "gradient", or "momentum" for
            :class:`MomentumCompressor` (AdamW only; the engine then calls its
            :meth:`~MomentumCompressor.step_` instead of ``optimizer.step()``).
    """
    check_compression(mode, topk_ratio, powersgd_rank)
    if target == "momentum":
        inner = make_compressor(mode, group, hvd, topk_ratio=topk_ratio,
                                powersgd_rank=powersgd_rank, seed=seed, device=device)
        return MomentumCompressor(inner, warmup_steps)
    if mode in HALF_DTYPES:
        return HalfPrecisionCompressor(group, hvd, mode, device)
    if mode == "topk":
        return TopKCompressor(group, hvd, topk_ratio, warmup_steps)
    if mode == "powersgd":
        return PowerSGDCompressor(group, hvd, powersgd_rank, seed, warmup_steps)
    return GradientCompressor(group, hvd)


class MomentumCompressor(GradientCompressor):
    """Compress AdamW's momentum instead of the gradient (the scheme of 1-bit Adam).

    For the first ``warmup_steps`` steps gradients are averaged uncompressed
    and AdamW runs as usual.  From then on AdamW's second moment ``v`` is
    frozen, and each step (in :meth:`step_`, which replaces the optimizer's
    step) every rank forms its local momentum ``m_i = b1 m + (1 - b1) g_i``
    from the shared momentum ``m`` and its own gradient ``g_i``, and the
    ``inner`` compressor (top-k or PowerSGD, with its error feedback)
    averages the ``m_i``.  The average becomes the new ``m`` on every rank
    and the parameters move by AdamW's rule with the frozen ``v``::

        p <- p (1 - lr wd) - lr (m / bc1) / (sqrt(v / bc2) + eps)

    Momentum changes slowly, so what the compressor drops or delays is small
    against it, and a frozen ``v`` cannot be inflated by the bursts that
    error feedback releases.  Top-k is fed ``m_i / (sqrt(v_hat) + eps)`` (the
    update itself; ``denom`` is the same on every rank, so averaging
    commutes with it) and picks the entries that move the weights most;
    PowerSGD is fed ``m_i`` (both choices measured better on the demo model).
    ``train.grad_clip`` then clips each rank's own gradient before it enters
    ``m_i`` (local clipping, as in Deep Gradient Compression).

    Args:
        inner: the compressor that averages the momenta (its own warm-up is not used).
        warmup_steps: uncompressed AdamW steps before ``v`` is frozen.
    """

    def __init__(self, inner: GradientCompressor, warmup_steps: int):
        super().__init__(inner.group, inner.hvd)
        self.inner = inner
        self.mode = inner.mode
        self.warmup_steps = int(warmup_steps)
        self.steps = 0
        #: Compress ``m / denom`` (top-k: measured better) or ``m`` (PowerSGD: measured better).
        self.scaled = inner.mode == "topk"

    @property
    def takes_step(self) -> bool:
        """True once the warm-up is over: :meth:`step_` replaces ``optimizer.step()``."""
        return self.steps > self.warmup_steps

    def reduce_grads_(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]]) -> None:
        """Warm-up: average the gradients uncompressed.  Later: nothing (see :meth:`step_`)."""
        self.steps += 1
        self.last_step_bytes = 0
        if not self.takes_step:
            super().reduce_grads_(named_parameters)

    def step_(self, optimizer: torch.optim.Optimizer,
              named_parameters: Sequence[tuple[str, torch.nn.Parameter]]) -> None:
        """Average the compressed local momenta and take an AdamW step with frozen ``v``.

        ``optimizer`` must be the ``torch.optim.AdamW`` that ran the warm-up
        (its ``exp_avg``, ``exp_avg_sq`` and ``step`` are used and updated).
        """
        by_param = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        params = [(n, p) for n, p in named_parameters if p.requires_grad]
        with torch.no_grad():
            local, names, denoms = [], [], []
            for name, p in params:
                group = by_param[id(p)]
                beta1, beta2 = group["betas"]
                state = optimizer.state[p]
                state["step"] += 1
                step = float(state["step"])
                denom = (state["exp_avg_sq"] / (1.0 - beta2 ** step)).sqrt_().add_(group["eps"])
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                m = beta1 * state["exp_avg"] + (1.0 - beta1) * grad.float()
                # The inner compressor sees m / denom, the update itself: its top-k
                # picks the entries that move the weights most (denom is shared).
                local.append(m / denom if self.scaled else m)
                names.append(name)
                denoms.append(denom)
            self.inner.reduce_(local, names)
            self.last_step_bytes = self.inner.last_step_bytes
            self.bytes_sent += self.last_step_bytes
            for (name, p), avg, denom in zip(params, local, denoms):
                group = by_param[id(p)]
                state = optimizer.state[p]
                beta1 = group["betas"][0]
                step = float(state["step"])
                state["exp_avg"].copy_(avg * denom if self.scaled else avg)
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1.0 - beta1 ** step))

    # The inner compressor's error feedback (and Q) is the state to save.
    def state_dict(self) -> dict[str, Any]:
        out = self.inner.state_dict()
        out["steps"] = int(self.steps)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
        self.steps = int(state.get("steps", 0))

    def forget_nonfinite(self) -> int:
        return self.inner.forget_nonfinite()
