"""Apply tensor parallelism to a plain Keras reference model from outside.

A plan maps logical module paths of the family contract (``*`` matches one
layer index: ``blocks.*.attn.qkv``) to a style.  :func:`parallelize` finds
the Keras layer holding each planned module (walking the model as the
checkpoint code does, :func:`hvdllm.tensorflow.state.keras_variable`), swaps it on its
parent for its tensor-parallel version sliced from the full weights the
model was built with, and replaces the loss with the vocabulary-parallel
one.  Each new layer takes the old one's name and place, so variable paths
(``gpt/block_0/attn/qkv/kernel``) and the order of
``model.trainable_variables`` do not change with tp.

The plans are not written here: :func:`family_plan` reads them off the
family contract (:mod:`hvdllm.common.family`), whose :class:`Split` of each
tensor is exactly what the layer chosen for it holds.
"""
from __future__ import annotations

import fnmatch
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import keras
import numpy as np
import tensorflow as tf

from ...common.family import FAMILIES, ModelSpec, Split, TensorRule, get_family
from ..models import MODEL_CLASSES, CausalLM
from ..state import keras_variable
from .layers import (ColumnParallelDense, ColumnRegionInput, RowParallelDense,
                     SequenceParallelPositionEmbedding, VocabParallelCrossEntropy,
                     VocabParallelEmbedding, VocabParallelLMHead)
from .mappings import TensorParallelGroup

Style = Callable[[keras.layers.Layer, TensorParallelGroup], keras.layers.Layer]


def colwise(parts: int = 1, shared_input: bool = False) -> Style:
    """Split output units (``parts`` fused blocks, e.g. 3 for q, k, v).

    ``shared_input``: consecutive layers fed the same tensor share one input
    collective each way.
    """
    return lambda layer, tp: ColumnParallelDense.from_dense(layer, tp, parts=parts,
                                                            shared_input=shared_input)


def rowwise(layer: keras.layers.Layer, tp: TensorParallelGroup) -> keras.layers.Layer:
    """Split input rows; sum the partial outputs."""
    return RowParallelDense.from_dense(layer, tp)


def vocab_embedding(layer: keras.layers.Layer, tp: TensorParallelGroup) -> keras.layers.Layer:
    return VocabParallelEmbedding.from_dense(layer, tp)


def vocab_head(layer: keras.layers.Layer, tp: TensorParallelGroup) -> keras.layers.Layer:
    return VocabParallelLMHead.from_dense(layer, tp)


def sequence_positions(layer: keras.layers.Layer, tp: TensorParallelGroup
                       ) -> keras.layers.Layer:
    return SequenceParallelPositionEmbedding.from_dense(layer, tp)


def tied_head_input(layer: keras.layers.Layer, tp: TensorParallelGroup) -> keras.layers.Layer:
    """The layer before a tied head: its output enters the head's column region."""
    return ColumnRegionInput(layer, tp)


def _style(rule: TensorRule) -> Style | None:
    """The layer that holds ``rule``'s split (it is the first tensor of its module)."""
    if rule.role == "positions":
        return sequence_positions  # replicated, but only this rank's positions are looked up
    if rule.split == "vocab":
        return vocab_embedding if rule.role == "embedding" else vocab_head
    if rule.split == "column":
        return colwise(parts=rule.parts, shared_input=rule.shared_input)
    if rule.split == "row":
        return rowwise
    return None


def family_plan(family: str) -> dict[str, Style]:
    """Module path pattern -> style for every module a family's tensor-parallel splits touch.

    A tied head (GPT's) has no layer in the Keras model: the model
    multiplies by the embedding, which is already split.  The module that
    feeds it (the final norm) is planned instead, to enter the column region.

    Args:
        family: "gpt" or "llama".
    """
    plan: dict[str, Style] = {}
    seen = set()
    previous = None
    for rule in get_family(family).rules:
        module = rule.module_pattern
        if module in seen:  # a module's first tensor (its weight) decides
            continue
        seen.add(module)
        if rule.tied_to is not None:
            plan[previous] = tied_head_input
        else:
            style = _style(rule)
            if style is not None:
                plan[module] = style
        previous = module
    return plan


PLANS: dict[str, dict[str, Style]] = {name: family_plan(name) for name in FAMILIES}
GPT_PLAN: dict[str, Style] = PLANS["gpt"]
LLAMA_PLAN: dict[str, Style] = PLANS["llama"]


def family_of(model: keras.Model) -> str:
    """The ``model.family`` of a Keras reference model."""
    for name, cls in MODEL_CLASSES.items():
        if isinstance(model, cls):
            return name
    raise TypeError(f"no tensor-parallel plan for {type(model).__name__}")


def _model_shape(model: CausalLM, family: str) -> SimpleNamespace:
    """What the family contract reads off a config, read off the model."""
    return SimpleNamespace(family=family, n_layer=model.n_layer, n_head=model.n_head,
                           d_model=model.d_model, seq_len=model.seq_len,
                           vocab_size=model.vocab_size,
                           kv_heads=getattr(model, "n_kv_head", model.n_head),
                           ff_width=model.d_ff)


def _children(layer: keras.layers.Layer) -> Iterator[tuple[str, keras.layers.Layer]]:
    """(attribute, sublayer) for every sublayer held by a public attribute or list of them."""
    for name, value in list(vars(layer).items()):
        if name.startswith("_"):
            continue
        if isinstance(value, keras.layers.Layer):
            yield name, value
        elif isinstance(value, (list, tuple)):
            yield from ((name, item) for item in value if isinstance(item, keras.layers.Layer))


def _owners(model: keras.Model) -> dict[int, tuple[keras.layers.Layer, str, keras.layers.Layer]]:
    """id(variable) -> (parent, attribute, layer) for every layer that owns variables itself."""
    out = {}
    stack = [model]
    while stack:
        parent = stack.pop()
        for attr, child in _children(parent):
            for v in child._trainable_variables:
                out.setdefault(id(v), (parent, attr, child))
            stack.append(child)
    return out


def _planned(model: CausalLM, spec: ModelSpec, plan: dict[str, Style]
             ) -> list[tuple[keras.layers.Layer, str, keras.layers.Layer, Style]]:
    """(parent, attribute, layer, style) for every layer a plan entry names, in model order.

    The contract's tensors are found on the model as the checkpoint code
    finds them (:func:`hvdllm.tensorflow.state.keras_variable`); a module's
    first tensor names its layer.
    """
    owners = _owners(model)
    out, seen, matched = [], set(), set()
    for tensor in spec:
        patterns = [p for p in plan if fnmatch.fnmatchcase(tensor.module, p)]
        found = keras_variable(model, tensor) if patterns else None
        if tensor.module in seen or found is None:
            continue
        seen.add(tensor.module)
        matched.add(patterns[0])
        owner = owners.get(id(found[0]))
        if owner is None:
            raise TypeError(f"{tensor.name} is not held by a layer attribute of "
                            f"{type(model).__name__}; it cannot be swapped")
        parent, attr, layer = owner
        if getattr(parent, attr, None) is not layer:
            raise TypeError(f"{layer.name} ({tensor.module}) sits in a list of {parent.name}; "
                            f"only a layer held by an attribute can be swapped")
        out.append((parent, attr, layer, plan[patterns[0]]))
    missing = sorted(set(plan) - matched)
    if missing:
        raise ValueError(f"tensor-parallel plan entries match no layer of "
                         f"{type(model).__name__}: {missing}")
    return out


def _swap(parent: keras.layers.Layer, attr: str, old: keras.layers.Layer,
          new: keras.layers.Layer) -> None:
    """Put ``new`` where ``old`` is: same attribute, same place among ``parent``'s layers.

    Keras orders a layer's variables by its list of sublayers; replacing
    the entry in place keeps ``trainable_variables`` in model order, and
    the old layer (with its full weights) leaves the model.  The attribute
    is then set as usual (the new layer is already tracked, so a built,
    locked parent accepts it).
    """
    parent._tracker.replace_tracked_value("layers", old, new)
    setattr(parent, attr, new)


def parallelize(model: CausalLM, tp: TensorParallelGroup,
                plan: dict[str, Style] | None = None) -> CausalLM:
    """Shard ``model`` in place over ``tp`` and return it.

    Args:
        model: a full, built plain GPT or Llama, initialised identically on
            every rank of the TP group (same seed, or the same checkpoint).
        tp: the tensor-parallel group; ``tp.sequence_parallel`` switches
            sequence parallelism on (read when the model runs).
        plan: module path pattern -> style; defaults to the model family's.
    """
    if tp.size == 1:
        return model
    if not model.built:
        raise ValueError(f"{type(model).__name__} must be built before it is parallelized")
    family = family_of(model)
    spec = get_family(family).spec(_model_shape(model, family))
    problems = spec.tp_problems(tp.size)
    if problems:
        raise ValueError(f"{type(model).__name__} does not split over tp={tp.size}: "
                         + "; ".join(problems))
    for parent, attr, layer, style in _planned(model, spec, plan or PLANS[family]):
        _swap(parent, attr, layer, style(layer, tp))
    # GPT's tied head reads model.token_embedding.embeddings: now this rank's shard.
    model.set_criterion(VocabParallelCrossEntropy(model.vocab_size, tp))
    object.__setattr__(model, "tensor_parallel", tp)
    return model


def variable_split(v: Any) -> Split:
    """The family-contract :class:`Split` a (possibly sharded) variable's TP tags describe."""
    if not getattr(v, "hvdllm_tp_sharded", False):
        return Split.replicated()
    return v.hvdllm_split


def replicated_variables(model: keras.layers.Layer) -> list:
    """Trainable variables every TP rank holds in full (norms, row-parallel biases, positions)."""
    return [v for v in model.trainable_variables if not getattr(v, "hvdllm_tp_sharded", False)]


def _keras_axis(v: Any, split: Split) -> int:
    """The axis of Keras variable ``v`` that ``split`` (torch orientation) splits."""
    if v.path.rsplit("/", 1)[-1] == "kernel" and len(v.shape) == 2:
        return 1 - split.dim  # a Dense kernel is (in, out)
    return split.dim


def full_tensor(v: Any, tp: TensorParallelGroup, value: Any = None) -> np.ndarray:
    """The full tensor of a TP shard, in ``v``'s own layout (every rank gets it; eager).

    Replicated variables come back as they are.  Collective over ``tp`` for
    sharded ones: every rank of it must call, in the same order.

    Args:
        v: a variable of a parallelized model.
        tp: its tensor-parallel group.
        value: a tensor laid out like ``v`` (its gradient, say) to assemble
            instead of ``v``'s own value.
    """
    if isinstance(value, tf.IndexedSlices):  # an embedding's gradient
        value = tf.convert_to_tensor(value)
    value = np.asarray(keras.ops.convert_to_numpy(v if value is None else value))
    split = variable_split(v)
    if not split.sharded or tp.size == 1:
        return value
    axis = _keras_axis(v, split)
    pieces = tp.all_gather(tf.convert_to_tensor(value)[None], 0).numpy()  # (tp, *shape)
    logical = [np.moveaxis(p, axis, split.dim) for p in pieces]
    return np.moveaxis(split.unshard(logical), split.dim, axis)


def full_weights(model: keras.layers.Layer) -> dict[str, np.ndarray]:
    """Every trainable variable of a (possibly TP-sharded) model as a full array.

    Keyed by the variable's path inside the model (``block_0/attn/qkv/kernel``),
    in Keras layout.  Collective over the model's TP group.
    """
    tp = getattr(model, "tensor_parallel", None)
    out = {}
    for v in model.trainable_variables:
        key = v.path.split("/", 1)[-1]
        out[key] = full_tensor(v, tp) if tp is not None else np.asarray(v.numpy())
    return out
