"""A torch rank's training state for checkpoints: capture to host, restore on any layout.

Every parameter is saved under its logical name (the model contract's: the
reference model's parameter name; the last pipeline stage's copy of GPT's
tied head is the embedding and is not saved twice).  Each piece records how
tensor parallelism split the logical tensor, so a restore re-slices it for
the layout it runs on.  Who writes what:

* parameters and plain optimizer slots (AdamW moments, SGD momentum): one
  data-parallel rank per tensor, spread so each writes about 1/dp of the
  bytes; for tensors every TP rank holds alike, TP rank 0 only;
* ZeRO-1 moments: every data-parallel rank its own flat ranges;
* compression state (error feedback, PowerSGD's Q), the RNG: every rank,
  as private state, restored only on the same rank of the same layout.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..common.errors import CheckpointError
from ..common.family import ModelSpec, shard
from ..common.train_checkpoint import CheckpointReader, Piece, RankState, balance
from .zero import ZeroAdamW

# Optimizer slots per optimizer, as (checkpoint kind, torch state key).
_SLOTS = {"adamw": (("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq")),
          "sgd": (("momentum", "momentum_buffer"),)}


def _host(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


class TorchState:
    """Capture and restore one torch engine's state.

    Args:
        model: this rank's (sharded, possibly cut) model.
        update: the engine's :class:`~hvdllm.torch.update.GradientUpdate`.
        groups: this rank's groups.
        optimizer_name: ``train.optimizer``.
        spec: the model contract (logical tensors, their TP splits, ties).
    """

    def __init__(self, model: torch.nn.Module, update: Any, groups: Any, optimizer_name: str,
                 spec: ModelSpec):
        self.model = model
        self.update = update
        self.groups = groups
        self.optimizer_name = optimizer_name
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        tied = spec.ties
        self.logical = {id(p): tied.get(n, n) for n, p in self.params}
        splits = spec.splits()
        unknown = sorted(n for n in self.logical.values() if n not in splits)
        if unknown:
            raise ValueError(f"parameters outside the model contract: {unknown}")
        self.tp_rank, self.tp_size = groups.tp.rank, groups.tp.size
        # Which data-parallel rank writes each parameter (and its plain slots).
        owners = balance([p.numel() for _, p in self.params], groups.dp.size)
        self.writer = {id(p): owners[i] == groups.dp.rank for i, (_, p) in enumerate(self.params)}
        self.splits = {i: splits[n].to_dict()
                       for i, n in self.logical.items()}

    def _owner(self, p: torch.Tensor) -> bool:
        """Whether this TP rank's copy of ``p`` is saved at all (not a duplicate)."""
        if getattr(p, "hvdllm_pp_duplicate", False):
            return False
        if not getattr(p, "hvdllm_tp_sharded", False) and self.tp_rank != 0:
            return False
        return True

    def _piece(self, p: torch.Tensor, kind: str, flat: tuple[int, int] | None = None) -> Piece:
        split = self.splits[id(p)]
        # A replicated tensor is whole on every TP rank: its piece is TP rank 0 of 1.
        rank, size = ((0, 1) if split["kind"] == "replicated"
                      else (self.tp_rank, self.tp_size))
        return Piece(self.logical[id(p)], kind, split, rank, size,
                     flat, tuple(p.shape) if flat is not None else None)

    # -- capture ------------------------------------------------------------
    def capture(self, out: RankState) -> None:
        """Copy into ``out`` everything a resume needs from this rank."""
        for _, p in self.params:
            if self.writer[id(p)] and self._owner(p):
                out.add(self._piece(p, "param"), _host(p))
        opt = self.update.optimizer
        if isinstance(opt, ZeroAdamW):
            self._capture_zero(opt, out)
        else:
            steps = set()
            for _, p in self.params:
                st = opt.state.get(p, {})
                if "step" in st:
                    steps.add(float(st["step"]))
                if self.writer[id(p)] and self._owner(p):
                    for kind, key in _SLOTS[self.optimizer_name]:
                        if key in st and st[key] is not None:
                            out.add(self._piece(p, kind), _host(st[key]))
            if len(steps) > 1:
                raise CheckpointError(f"optimizer step counts differ between parameters: "
                                      f"{sorted(steps)}")
            out.shared["optimizer_steps"] = steps.pop() if steps else 0.0
        out.shared["optimizer"] = self.optimizer_name
        scale = self.update.precision.loss_scale
        if scale is not None:
            out.shared["loss_scale"] = scale.state_dict()
        comp = self.update.compressor
        if comp is not None:
            state = comp.state_dict()
            out.private["compression_steps"] = state.pop("steps")
            for key, t in state.items():
                out.add(Piece(f"compression/{key}", "private"), _host(t))
        out.add(Piece("rng/torch", "private"), torch.get_rng_state().numpy())

    def _capture_zero(self, opt: ZeroAdamW, out: RankState) -> None:
        out.shared["optimizer_steps"] = float(opt.steps)
        for piece in opt.layout.shard_slices(opt.group.rank):
            p = opt.params[piece.index]
            if not self._owner(p):
                continue
            flat = (piece.param_start, piece.param_end)
            lo, hi = piece.shard_start, piece.shard_start + piece.numel
            for kind in ("exp_avg", "exp_avg_sq"):
                out.add(self._piece(p, kind, flat), _host(getattr(opt, kind)[lo:hi]))

    # -- restore ------------------------------------------------------------
    def _local(self, reader: CheckpointReader, kind: str, p: torch.Tensor) -> torch.Tensor:
        full = reader.logical(kind, self.logical[id(p)])
        local = shard(full, self.splits[id(p)], self.tp_rank, self.tp_size)
        if tuple(local.shape) != tuple(p.shape):
            raise CheckpointError(f"{reader.path}: {kind} of '{self.logical[id(p)]}' gives a "
                                  f"shard of shape {tuple(local.shape)}, this rank holds "
                                  f"{tuple(p.shape)}")
        return torch.from_numpy(np.ascontiguousarray(local)).to(p.dtype)

    @torch.no_grad()
    def restore(self, reader: CheckpointReader, same_layout: bool) -> list[str]:
        """Load this rank's part of ``reader``'s checkpoint; returns notes for the log.

        Args:
            reader: the checkpoint.
            same_layout: it was saved at this run's dp x tp x pp, so
                rank-private state (compression, RNG) is restored too.
        """
        notes = []
        for _, p in self.params:
            p.copy_(self._local(reader, "param", p))
        saved_opt = reader.shared.get("optimizer")
        if saved_opt != self.optimizer_name:
            raise CheckpointError(f"{reader.path} holds {saved_opt} optimizer state, this run "
                                  f"uses train.optimizer = {self.optimizer_name!r}")
        steps = float(reader.shared["optimizer_steps"])
        opt = self.update.optimizer
        if isinstance(opt, ZeroAdamW):
            self._restore_zero(opt, reader, steps)
        else:
            for _, p in self.params:
                st: dict[str, Any] = {}
                if self.optimizer_name == "adamw" and steps > 0:
                    st["step"] = torch.tensor(steps, dtype=torch.float32)
                for kind, key in _SLOTS[self.optimizer_name]:
                    if reader.has(kind, self.logical[id(p)]):
                        st[key] = self._local(reader, kind, p).clone()
                if st:
                    opt.state[p] = st
        scale = self.update.precision.loss_scale
        if scale is not None and "loss_scale" in reader.shared:
            scale.load_state_dict(reader.shared["loss_scale"])
        rank = self.groups.world.rank
        comp = self.update.compressor
        if comp is not None:
            if same_layout and "compression_steps" in reader.rank_state(rank):
                state: dict[str, Any] = {"steps": reader.rank_state(rank)["compression_steps"]}
                for key in reader.private_keys(rank):
                    if key.startswith("compression/"):
                        state[key[len("compression/"):]] = torch.from_numpy(
                            reader.private(rank, key))
                comp.load_state_dict(state)
            else:
                notes.append("gradient compression state (error feedback) starts afresh: the "
                             "layout changed")
        rng = reader.private(rank, "rng/torch") if same_layout else None
        if rng is not None:
            torch.set_rng_state(torch.from_numpy(rng.astype(np.uint8)))
        return notes

    def _restore_zero(self, opt: ZeroAdamW, reader: CheckpointReader, steps: float) -> None:
        opt.steps = int(steps)
        lo, hi = opt.shard_range
        opt.master.copy_(opt.flat_params()[lo:hi])
        if steps <= 0:
            return
        for kind in ("exp_avg", "exp_avg_sq"):
            flat = torch.zeros(opt.layout.padded, dtype=torch.float32)
            for p, offset in zip(opt.params, opt.layout.offsets):
                flat[offset:offset + p.numel()] = self._local(reader, kind, p).reshape(-1)
            getattr(opt, kind).copy_(flat[lo:hi])
