"""A TensorFlow rank's training state for checkpoints, under the model contract's names.

Keras variables are mapped onto the logical tensors of the model contract
(the names and orientation of :mod:`hvdllm.common.family`): a Dense kernel
is stored as ``(out, in)``, transposed from Keras's ``(in, out)``, so a
checkpoint reads the same whichever framework wrote it.  AdamW's
``momentum`` and ``velocity`` slots are the ``exp_avg`` and ``exp_avg_sq``
pieces; its ``iteration`` counter is the shared optimizer step count.

Every data-parallel rank holds the same parameters and slots; each
variable is written by one of them, spread so each writes about 1/dp of
the bytes.  Each rank writes its own non-trainable variables (random
generator states) as private state.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np

from ..common.errors import CheckpointError
from ..common.train_checkpoint import CheckpointReader, Piece, RankState, balance

_RULES = [
    (re.compile(r"^token_embedding/embeddings$"), "wte.weight", False),
    (re.compile(r"^position_embedding/embeddings$"), "wpe.weight", False),
    (re.compile(r"^block_(\d+)/(ln_1|ln_2)/gamma$"), r"blocks.\1.\2.weight", False),
    (re.compile(r"^block_(\d+)/(ln_1|ln_2)/beta$"), r"blocks.\1.\2.bias", False),
    (re.compile(r"^block_(\d+)/(attn|mlp)/(qkv|proj|fc)/kernel$"), r"blocks.\1.\2.\3.weight",
     True),
    (re.compile(r"^block_(\d+)/(attn|mlp)/(qkv|proj|fc)/bias$"), r"blocks.\1.\2.\3.bias",
     False),
    (re.compile(r"^ln_f/gamma$"), "ln_f.weight", False),
    (re.compile(r"^ln_f/beta$"), "ln_f.bias", False),
    # llama
    (re.compile(r"^tok_emb/embeddings$"), "tok_emb.weight", False),
    (re.compile(r"^block_(\d+)/(attn_norm|mlp_norm)/weight$"), r"blocks.\1.\2.weight", False),
    (re.compile(r"^block_(\d+)/(attn|mlp)/(wq|wk|wv|wo|w_gate|w_up|w_down)/kernel$"),
     r"blocks.\1.\2.\3.weight", True),
    (re.compile(r"^norm/weight$"), "norm.weight", False),
    (re.compile(r"^lm_head/kernel$"), "lm_head.weight", True),
]


def logical_name(path: str) -> tuple[str, bool]:
    """The logical tensor of Keras variable ``path`` and whether it is stored transposed.

    The first component (the model's name: "gpt", or "gpt_2" for a second
    model in one process) is not part of the logical name.
    """
    inner = path.split("/", 1)[-1]
    for pattern, name, transpose in _RULES:
        if pattern.match(inner):
            return pattern.sub(name, inner), transpose
    raise CheckpointError(f"no logical tensor for the Keras variable {path}")


def assign_logical(variables: list, tensors: Mapping[str, np.ndarray], where: str,
                   tied: Iterable[str] = ()) -> None:
    """Fill Keras ``variables`` from full logical tensors (``model.init_from``, tests).

    Args:
        variables: the model's trainable variables.
        tensors: logical name -> full tensor.
        where: the source, for messages.
        tied: logical names the model holds only through another tensor
            (GPT's head is its embedding); ignored when present.

    Raises:
        CheckpointError: naming every tensor that is missing, unexpected or misshapen.
    """
    from ..common.checkpoint import check_tensors

    names = [logical_name(v.path) for v in variables]
    expected = {name: tuple(v.shape)[::-1] if transpose else tuple(v.shape)
                for v, (name, transpose) in zip(variables, names)}
    tied = set(tied)
    check_tensors({k: tuple(np.shape(t)) for k, t in tensors.items() if k not in tied},
                  expected, where)
    for v, (name, transpose) in zip(variables, names):
        value = np.asarray(tensors[name], np.float32)
        v.assign(np.ascontiguousarray(value.T if transpose else value))


class TensorFlowState:
    """Capture and restore a TensorFlow engine's model and AdamW state.

    Args:
        variables: the model's trainable variables.
        optimizer: the built Keras AdamW.
        extra: the model's non-trainable variables (random generator states).
        dp_rank, dp_size: this rank's place in the data-parallel group.
        world_rank: this rank's world rank.
    """

    def __init__(self, variables: list, optimizer: Any, extra: list, dp_rank: int,
                 dp_size: int, world_rank: int):
        self.variables = variables
        self.optimizer = optimizer
        self.extra = extra
        self.world_rank = world_rank
        owners = balance([int(np.prod(v.shape)) for v in variables], dp_size)
        self.mine = [owner == dp_rank for owner in owners]
        self.names = [logical_name(v.path) for v in variables]
        # Keras names a slot after its variable's path: "<prefix>/gpt_block_0_..._momentum".
        by_name = {v.path.rsplit("/", 1)[-1]: v for v in optimizer.variables}
        self.slots = {}
        for kind, suffix in (("exp_avg", "momentum"), ("exp_avg_sq", "velocity")):
            slots = [by_name.get(v.path.replace("/", "_") + "_" + suffix) for v in variables]
            if any(s is None for s in slots):
                raise CheckpointError(f"the Keras optimizer has no {suffix} slot for some "
                                      f"variables; build it before capturing its state")
            self.slots[kind] = slots

    def capture(self, out: RankState) -> None:
        for i, (name, transpose) in enumerate(self.names):
            if self.mine[i]:
                for kind, var in (("param", self.variables[i]),
                                  ("exp_avg", self.slots["exp_avg"][i]),
                                  ("exp_avg_sq", self.slots["exp_avg_sq"][i])):
                    value = var.numpy()
                    out.add(Piece(name, kind), value.T if transpose else value)
        out.shared["optimizer"] = "adamw"
        out.shared["optimizer_steps"] = float(self.optimizer.iterations.numpy())
        for var in self.extra:
            out.add(Piece(f"keras/{var.path}", "private"), var.numpy())

    def restore(self, reader: CheckpointReader, same_layout: bool) -> list[str]:
        if reader.shared.get("optimizer") != "adamw":
            raise CheckpointError(f"{reader.path} holds {reader.shared.get('optimizer')} "
                                  f"optimizer state; the TensorFlow engine uses adamw")
        for i, (name, transpose) in enumerate(self.names):
            for kind, var in (("param", self.variables[i]),
                              ("exp_avg", self.slots["exp_avg"][i]),
                              ("exp_avg_sq", self.slots["exp_avg_sq"][i])):
                value = reader.logical(kind, name)
                value = value.T if transpose else value
                if tuple(value.shape) != tuple(var.shape):
                    raise CheckpointError(f"{reader.path}: {kind} of '{name}' has shape "
                                          f"{tuple(value.shape)}, the model needs "
                                          f"{tuple(var.shape)}")
                var.assign(np.ascontiguousarray(value, dtype=var.dtype))
        self.optimizer.iterations.assign(int(reader.shared["optimizer_steps"]))
        if same_layout:
            for var in self.extra:
                value = reader.private(self.world_rank, f"keras/{var.path}")
                if value is not None:
                    var.assign(value)
        return []
