"""A TensorFlow rank's training state for checkpoints, under the model contract's names.

Keras variables are found from the model contract (:mod:`hvdllm.common.family`):
each logical tensor's module path is walked on the Keras model (``wte`` is
the ``token_embedding`` layer, ``wpe`` the ``position_embedding`` one) and
its role says which Keras variable holds it and in which orientation: a
Dense kernel is stored as ``(out, in)``, transposed from Keras's
``(in, out)``, so a checkpoint reads the same whichever framework wrote it.
The walk goes by object, not by variable path, so layers that tensor
parallelism swapped in are found just the same.

As in torch, every piece records how tensor parallelism split its logical
tensor, so a restore re-slices it for the layout it runs on.  Who writes
what:

* parameters and optimizer slots (AdamW's ``momentum`` and ``velocity``
  are ``exp_avg`` and ``exp_avg_sq``; SGD's ``momentum``): one
  data-parallel rank per tensor, spread so each writes about 1/dp of the
  bytes; for tensors every TP rank holds alike, TP rank 0 only; the last
  pipeline stage's copy of GPT's tied embedding is not written;
* ZeRO-1 moments: gathered over DP at capture and written like plain
  slots (a flat range of a Keras kernel is not one of its transposed
  logical tensor);
* compression state, the random generator states: every rank, as private
  state, restored only on the same rank of the same layout.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import keras
import numpy as np

from ..common.errors import CheckpointError
from ..common.family import LogicalTensor, ModelSpec, shard
from ..common.train_checkpoint import CheckpointReader, Piece, RankState, balance

# Module names of the contract that the Keras models spell differently.
_KERAS_MODULES = {"wte": "token_embedding", "wpe": "position_embedding"}
# (role, leaf) -> Keras variable attributes to try, and whether it is stored transposed.
_KERAS_LEAVES = {
    ("embedding", "weight"): (("embeddings",), False),
    ("positions", "weight"): (("embeddings",), False),
    ("norm", "weight"): (("gamma", "weight"), False),
    ("norm", "bias"): (("beta",), False),
    ("linear", "weight"): (("kernel",), True),
    ("bias", "bias"): (("bias",), False),
    ("head", "weight"): (("kernel",), True),
}
# Optimizer slots per optimizer, as (checkpoint kind, Keras slot suffix).
_SLOTS = {"adamw": (("exp_avg", "momentum"), ("exp_avg_sq", "velocity")),
          "sgd": (("momentum", "momentum"),)}


def keras_variable(model: Any, tensor: LogicalTensor) -> tuple[Any, bool] | None:
    """The Keras variable holding ``tensor`` and whether it is stored transposed.

    None when the model does not hold it (a pipeline stage without that
    block, or a tied tensor).
    """
    *path, leaf = tensor.name.split(".")
    obj = model
    for part in path:
        if part.isdigit():  # by name: a pipeline stage holds only some of the blocks
            obj = next((b for b in obj if b.name == f"block_{part}"), None)
        else:
            obj = getattr(obj, _KERAS_MODULES.get(part, part), None)
        if obj is None:
            return None
    attrs, transposed = _KERAS_LEAVES[(tensor.role, leaf)]
    for attr in attrs:
        var = getattr(obj, attr, None)
        if isinstance(var, keras.Variable):
            return var, transposed
    return None


def logical_variables(model: Any, spec: ModelSpec) -> list[tuple[str, Any, bool]]:
    """``(logical name, variable, transposed)`` for every stored tensor the model holds."""
    out = []
    for tensor in spec.stored:
        found = keras_variable(model, tensor)
        if found is not None:
            out.append((tensor.name, *found))
    return out


def assign_logical(model: Any, spec: ModelSpec, tensors: Mapping[str, np.ndarray],
                   where: str) -> None:
    """Fill a full (unsharded) Keras model from full logical tensors (``model.init_from``).

    Args:
        model: the built Keras model.
        spec: its family contract.
        tensors: logical name -> full tensor.
        where: the source, for messages.

    Raises:
        CheckpointError: naming every tensor that is missing, unexpected or misshapen.
    """
    from ..common.checkpoint import check_tensors

    held = logical_variables(model, spec)
    expected = {name: tuple(v.shape)[::-1] if t else tuple(v.shape) for name, v, t in held}
    tied = set(spec.ties)
    check_tensors({k: tuple(np.shape(a)) for k, a in tensors.items() if k not in tied},
                  expected, where)
    for name, var, transposed in held:
        value = np.asarray(tensors[name], np.float32)
        var.assign(np.ascontiguousarray(value.T if transposed else value))


def _slot(optimizer: Any, var: Any, suffix: str) -> Any:
    """The Keras optimizer slot ``suffix`` of ``var`` ("<var path with _>_<suffix>")."""
    key = var.path.replace("/", "_") + "_" + suffix
    for slot in optimizer.variables:
        if slot.path.rsplit("/", 1)[-1] == key:
            return slot
    raise CheckpointError(f"the optimizer has no {suffix} slot for {var.path}; build it "
                          f"before capturing its state")


class TensorFlowState:
    """Capture and restore one TensorFlow engine's state.

    Args:
        model: this rank's (sharded) Keras model.
        variables: the variables this rank trains (a pipeline stage's own).
        update: the engine's :class:`~hvdllm.tensorflow.update.GradientUpdate`.
        groups: this rank's groups.
        optimizer_name: ``train.optimizer``.
        spec: the model contract.
        extra: non-trainable variables saved privately (random generator states).
    """

    def __init__(self, model: Any, variables: list, update: Any, groups: Any,
                 optimizer_name: str, spec: ModelSpec, extra: Iterable = ()):
        self.update = update
        self.groups = groups
        self.optimizer_name = optimizer_name
        self.extra = list(extra)
        by_id = {id(v): (name, t) for name, v, t in logical_variables(model, spec)}
        for name, target in spec.ties.items():  # a pipeline stage's own copy of a tied tensor
            by_id.update({id(v): (target, False) for v in variables
                          if getattr(v, "hvdllm_logical", None) in (name, target)})
        missing = [v.path for v in variables if id(v) not in by_id]
        if missing:
            raise CheckpointError(f"Keras variables outside the model contract: {missing}")
        self.variables = list(variables)
        self.names = [by_id[id(v)] for v in self.variables]
        splits = spec.splits()
        self.splits = [splits[name].to_dict() for name, _ in self.names]
        self.tp_rank, self.tp_size = groups.tp.rank, groups.tp.size
        owners = balance([int(np.prod(v.shape)) for v in self.variables], groups.dp.size)
        self.writer = [owner == groups.dp.rank for owner in owners]

    # -- helpers --------------------------------------------------------------
    def _owner(self, var: Any) -> bool:
        """Whether this rank's copy of ``var`` is saved at all (not a duplicate)."""
        if getattr(var, "hvdllm_pp_duplicate", False):
            return False
        return bool(getattr(var, "hvdllm_tp_sharded", False)) or self.tp_rank == 0

    def _piece(self, i: int, kind: str, flat: tuple[int, int] | None = None,
               shard_shape: tuple[int, ...] | None = None) -> Piece:
        split = self.splits[i]
        rank, size = (0, 1) if split["kind"] == "replicated" else (self.tp_rank, self.tp_size)
        return Piece(self.names[i][0], kind, split, rank, size, flat, shard_shape)

    def _logical_shape(self, i: int) -> tuple[int, ...]:
        shape = tuple(self.variables[i].shape)
        return shape[::-1] if self.names[i][1] else shape

    def _to_logical(self, i: int, value: np.ndarray) -> np.ndarray:
        value = np.asarray(value, np.float32)
        return value.T if self.names[i][1] else value

    def _local(self, reader: CheckpointReader, kind: str, i: int) -> np.ndarray:
        """This rank's shard of logical tensor ``i``, in Keras orientation."""
        name, transposed = self.names[i]
        local = shard(reader.logical(kind, name), self.splits[i], self.tp_rank, self.tp_size)
        if tuple(local.shape) != self._logical_shape(i):
            raise CheckpointError(f"{reader.path}: {kind} of '{name}' gives a shard of shape "
                                  f"{tuple(local.shape)}, this rank holds "
                                  f"{self._logical_shape(i)}")
        return np.ascontiguousarray(local.T if transposed else local, np.float32)

    # -- capture --------------------------------------------------------------
    def capture(self, out: RankState) -> None:
        """Copy into ``out`` everything a resume needs from this rank."""
        for i, var in enumerate(self.variables):
            if self.writer[i] and self._owner(var):
                out.add(self._piece(i, "param"), self._to_logical(i, var.numpy()))
        if self.update.zero:
            self._capture_zero(self.update.optimizer, out)
        else:
            opt = self.update.optimizer
            for i, var in enumerate(self.variables):
                if self.writer[i] and self._owner(var):
                    for kind, suffix in _SLOTS[self.optimizer_name]:
                        value = _slot(opt, var, suffix).numpy()
                        out.add(self._piece(i, kind), self._to_logical(i, value))
            out.shared["optimizer_steps"] = float(opt.iterations.numpy())
        out.shared["optimizer"] = self.optimizer_name
        scaler = self.update.precision.loss_scale
        if scaler is not None:
            out.shared["loss_scale"] = scaler.state_dict()
        comp = self.update.compressor
        if comp is not None:
            state = comp.state_dict()
            out.private["compression_steps"] = state.pop("steps")
            for key, value in state.items():
                out.add(Piece(f"compression/{key}", "private"), np.asarray(value))
        for var in self.extra:
            out.add(Piece(f"keras/{var.path}", "private"), var.numpy())

    def _capture_zero(self, zero: Any, out: RankState) -> None:
        """ZeRO-1 moments as whole tensors, gathered over DP (collective: every DP rank calls).

        A flat range of a Keras kernel is not a flat range of its
        transposed logical tensor, so the moments are gathered and each
        written whole by the rank that writes the parameter.
        """
        state = zero.gather_state_tensors()
        out.shared["optimizer_steps"] = float(state["steps"])
        for i, var in enumerate(self.variables):
            if self.writer[i] and self._owner(var):
                for kind in ("exp_avg", "exp_avg_sq"):
                    out.add(self._piece(i, kind), self._to_logical(i, state[kind][i]))

    # -- restore --------------------------------------------------------------
    def restore(self, reader: CheckpointReader, same_layout: bool) -> list[str]:
        """Load this rank's part of ``reader``'s checkpoint; returns notes for the log."""
        notes = []
        saved_opt = reader.shared.get("optimizer")
        if saved_opt != self.optimizer_name:
            raise CheckpointError(f"{reader.path} holds {saved_opt} optimizer state, this run "
                                  f"uses train.optimizer = {self.optimizer_name!r}")
        for i, var in enumerate(self.variables):
            var.assign(self._local(reader, "param", i))
        steps = int(reader.shared["optimizer_steps"])
        if self.update.zero:  # after the variables: ZeRO re-reads its master shard from them
            state: dict[str, Any] = {"steps": steps}
            for kind, _ in _SLOTS[self.optimizer_name]:
                state[kind] = [self._local(reader, kind, i) if reader.has(kind, self.names[i][0])
                               else np.zeros(var.shape, np.float32)
                               for i, var in enumerate(self.variables)]
            self.update.optimizer.load_state_tensors(state)
        else:
            opt = self.update.optimizer
            for i, var in enumerate(self.variables):
                for kind, suffix in _SLOTS[self.optimizer_name]:
                    if reader.has(kind, self.names[i][0]):
                        _slot(opt, var, suffix).assign(self._local(reader, kind, i))
            opt.iterations.assign(steps)
        scaler = self.update.precision.loss_scale
        if scaler is not None and "loss_scale" in reader.shared:
            scaler.load_state_dict(reader.shared["loss_scale"])
        rank = self.groups.world.rank
        comp = self.update.compressor
        if comp is not None:
            if same_layout and "compression_steps" in reader.rank_state(rank):
                state = {"steps": reader.rank_state(rank)["compression_steps"]}
                for key in reader.private_keys(rank):
                    if key.startswith("compression/"):
                        state[key[len("compression/"):]] = reader.private(rank, key)
                comp.load_state_dict(state)
            else:
                notes.append("gradient compression state (error feedback) starts afresh: the "
                             "layout changed")
        if same_layout:
            for var in self.extra:
                value = reader.private(rank, f"keras/{var.path}")
                if value is not None:
                    var.assign(value)
        return notes
