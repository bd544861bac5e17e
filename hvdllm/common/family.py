"""The model families as data: one framework-free contract per family (numpy only).

Everything that depends on which family a model belongs to is read from
here rather than spelled out again per consumer:

* every logical tensor, in model order, with hvdllm's name for it (the
  PyTorch reference models' parameter names, e.g. ``blocks.0.attn.qkv.weight``),
  its shape for a model config, and the piece of the model it belongs to
  (the embedding, block ``i`` or the head), which is what a pipeline cut
  moves around;
* how tensor parallelism splits it (:class:`Split`, also a small JSON-able
  dict for checkpoint manifests) and the pure numpy :func:`shard` and
  :func:`unshard` that produce and reassemble exactly the pieces the
  tensor-parallel layers hold;
* which tensors are tied (GPT's output head is its token embedding);
* the Hugging Face names (and which matrices Hugging Face stores transposed);
* the default MLP width.

Matrices are laid out (out, in), as in ``torch.nn.Linear``.  A framework
whose layers store (in, out) kernels (Keras ``Dense``) maps its variables
onto these names with a transpose, the way the Hugging Face GPT-2 mapping
does; :attr:`LogicalTensor.role` says which tensors are such matrices.

:func:`family_spec` resolves a family for one model config into a
:class:`ModelSpec`; :data:`FAMILIES` holds the unresolved descriptions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol

# The splits are part of the contract; they live in their own module.
from .tp_split import SPLIT_KINDS, Split, padded_rows, shard, unshard  # noqa: F401

Shape = tuple[int, ...]

# Pieces of the model, as a pipeline cut sees them.
EMBEDDING, BLOCK, HEAD = "embedding", "block", "head"
SECTIONS = (EMBEDDING, BLOCK, HEAD)
BLOCKS = "blocks"  # block i's tensors are named "blocks.{i}.<rest>"

# What a tensor is, for adapters that build or map layers:
#   embedding  token embedding table (vocab, d_model)
#   positions  learned position table (positions, d_model)
#   linear     weight matrix of a linear layer, (out, in)
#   bias       bias of a linear layer
#   norm       scale or shift of a normalisation layer
#   head       output projection (vocab, d_model), a linear layer's weight
ROLES = ("embedding", "positions", "linear", "bias", "norm", "head")

# -- family descriptions ---------------------------------------------------

class ModelShape(Protocol):
    """What :func:`family_spec` reads off a config (``ModelConfig`` has all of it)."""

    family: str
    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    vocab_size: int

    @property
    def kv_heads(self) -> int: ...

    @property
    def ff_width(self) -> int: ...


@dataclass(frozen=True)
class TensorRule:
    """One tensor of a family, before a config gives it a shape.

    Attributes:
        name: hvdllm name; for block tensors relative to ``blocks.{i}.``.
        section: EMBEDDING, BLOCK or HEAD.
        shape: dimension symbols (see :meth:`Family.dims`).
        split: split kind (one of :data:`SPLIT_KINDS`).
        parts: fused blocks of a column split.
        role: one of :data:`ROLES`.
        units: config key whose count (heads, MLP width) the split
            dimension is made of; tp must divide it.  None when unsplit or
            padded (vocabulary).
        shared_input: a column-split matrix that reads the same input as its
            neighbours (LLaMA's q, k, v; gate, up): a TP implementation may
            share one input collective between them.
        tied_to: the hvdllm name of the tensor this one is (not stored).
        hf_name: Hugging Face name; for block tensors relative to the
            family's ``hf_layer_prefix`` + ``{i}.``.
        hf_transposed: Hugging Face stores the matrix transposed, (in, out).
    """

    name: str
    section: str
    shape: tuple[str, ...]
    split: str = "replicated"
    parts: int = 1
    role: str = "norm"
    units: str | None = None
    shared_input: bool = False
    tied_to: str | None = None
    hf_name: str | None = None
    hf_transposed: bool = False

    @property
    def pattern(self) -> str:
        """The name with ``*`` for the layer index (``blocks.*.attn.qkv.weight``)."""
        return f"{BLOCKS}.*.{self.name}" if self.section == BLOCK else self.name

    @property
    def module_pattern(self) -> str:
        """:attr:`pattern` without the last component (``blocks.*.attn.qkv``)."""
        return self.pattern.rpartition(".")[0]


@dataclass(frozen=True)
class LogicalTensor:
    """One logical (full, unsharded) tensor of a model.

    Attributes:
        name: hvdllm name (``blocks.0.attn.qkv.weight``).
        shape: full shape.
        section: EMBEDDING, BLOCK or HEAD: where a pipeline cut puts it.
        block: the layer index for BLOCK tensors, else None.
        split: how tensor parallelism splits it.
        role: one of :data:`ROLES`.
        units: ``(config key, count)`` the split dimension is made of
            (heads, MLP width); tp must divide the count.  None if any tp works.
        shared_input: see :attr:`TensorRule.shared_input`.
        tied_to: the name of the tensor this one is; a tied tensor is not
            stored (checkpoints keep its source only).
        hf_name: Hugging Face name (a tied tensor's name there, too).
        hf_transposed: stored transposed in Hugging Face checkpoints.
    """

    name: str
    shape: Shape
    section: str
    block: int | None
    split: Split
    role: str
    units: tuple[str, int] | None = None
    shared_input: bool = False
    tied_to: str | None = None
    hf_name: str | None = None
    hf_transposed: bool = False

    @property
    def module(self) -> str:
        """The name without its last component (``blocks.0.attn.qkv``)."""
        return self.name.rpartition(".")[0]

    @property
    def stored(self) -> bool:
        """False for a tied tensor (it is stored under the name of its source)."""
        return self.tied_to is None


@dataclass(frozen=True)
class Family:
    """One model family: its tensors as rules, its Hugging Face layout, its defaults.

    Attributes:
        name: the ``model.family`` value.
        rules: every tensor: the embedding's, one block's, the head's, each in
            model order.
        ff_default: (numerator, denominator, multiple): the default MLP width
            is ``d_model * numerator / denominator`` rounded up to the multiple.
        positions: "learned" (a position table, bounded by seq_len) or
            "rotary" (no position tensor; ``rope_theta`` matters).
        hf_model_type: Hugging Face's ``model_type``.
        hf_layer_prefix: Hugging Face name prefix of block ``i`` (before ``{i}.``).
        hf_optional_prefix: a prefix some checkpoints of the family leave off
            (GPT-2 saved from ``GPT2Model``); "" if none.
        hf_ignored: regex (full match) of Hugging Face buffers that carry no
            parameter and are skipped on import.
    """

    name: str
    rules: tuple[TensorRule, ...]
    ff_default: tuple[int, int, int]
    positions: str
    hf_model_type: str
    hf_layer_prefix: str
    hf_optional_prefix: str
    hf_ignored: str

    @property
    def grouped_query(self) -> bool:
        """Whether keys and values may have fewer heads than queries (``n_kv_head``)."""
        return any(rule.units == "n_kv_head" for rule in self.rules)

    def default_d_ff(self, d_model: int) -> int:
        """The MLP width ``d_ff = 0`` stands for."""
        num, den, multiple = self.ff_default
        return multiple * math.ceil(num * d_model / den / multiple)

    def dims(self, cfg: ModelShape) -> dict[str, int]:
        """Dimension symbol -> size for ``cfg`` (the symbols rules' shapes use)."""
        head_dim = cfg.d_model // cfg.n_head
        return {"vocab": cfg.vocab_size, "positions": cfg.seq_len, "d_model": cfg.d_model,
                "ff": cfg.ff_width, "heads": cfg.n_head * head_dim,
                "kv": cfg.kv_heads * head_dim, "qkv": 3 * cfg.d_model}

    @staticmethod
    def units(cfg: ModelShape) -> dict[str, int]:
        """Config key -> count, for :attr:`TensorRule.units`."""
        return {"n_head": cfg.n_head, "n_kv_head": cfg.kv_heads, "d_ff": cfg.ff_width}

    def spec(self, cfg: ModelShape) -> "ModelSpec":
        """Every tensor of the model ``cfg`` describes, resolved."""
        if cfg.family != self.name:
            raise ValueError(f"a {cfg.family} config given to the {self.name} family")
        dims, units = self.dims(cfg), self.units(cfg)
        rules = {section: [r for r in self.rules if r.section == section] for section in SECTIONS}
        out = [self._resolve(r, None, dims, units) for r in rules[EMBEDDING]]
        for i in range(cfg.n_layer):
            out += [self._resolve(r, i, dims, units) for r in rules[BLOCK]]
        out += [self._resolve(r, None, dims, units) for r in rules[HEAD]]
        return ModelSpec(self, tuple(out))

    def _resolve(self, rule: TensorRule, block: int | None, dims: Mapping[str, int],
                 units: Mapping[str, int]) -> LogicalTensor:
        shape = tuple(dims[d] for d in rule.shape)
        if rule.split == "vocab":
            split = Split.vocab(shape[0])
        elif rule.split == "column":
            split = Split.column(rule.parts)
        elif rule.split == "row":
            split = Split.row()
        else:
            split = Split.replicated()

        def place(name: str | None, prefix: str) -> str | None:
            if name is None or block is None:
                return name
            return f"{prefix}{block}.{name}"

        hf_prefix = self.hf_layer_prefix
        return LogicalTensor(
            name=place(rule.name, f"{BLOCKS}."), shape=shape, section=rule.section, block=block,
            split=split, role=rule.role,
            units=None if rule.units is None else (rule.units, units[rule.units]),
            shared_input=rule.shared_input, tied_to=place(rule.tied_to, f"{BLOCKS}."),
            hf_name=place(rule.hf_name, hf_prefix), hf_transposed=rule.hf_transposed)


@dataclass(frozen=True)
class ModelSpec:
    """The tensors of one model (a family resolved for a config), in model order.

    Attributes:
        family: the family description.
        tensors: every logical tensor, tied ones included, in model order.
    """

    family: Family
    tensors: tuple[LogicalTensor, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {t.name: t for t in self.tensors})

    def __iter__(self) -> Iterator[LogicalTensor]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> LogicalTensor:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{self.family.name} has no tensor named {name!r}") from None

    @property
    def names(self) -> tuple[str, ...]:
        """Every tensor name, tied ones included, in model order."""
        return tuple(t.name for t in self.tensors)

    @property
    def stored(self) -> tuple[LogicalTensor, ...]:
        """The tensors a checkpoint holds (tied ones left out), in model order."""
        return tuple(t for t in self.tensors if t.stored)

    def shapes(self, tied: bool = False) -> dict[str, Shape]:
        """Name -> full shape, in model order.

        Args:
            tied: include tied tensors (GPT's ``lm_head.weight``) too.
        """
        return {t.name: t.shape for t in self.tensors if tied or t.stored}

    def splits(self) -> dict[str, Split]:
        """Name -> tensor-parallel split of every tensor."""
        return {t.name: t.split for t in self.tensors}

    @property
    def ties(self) -> dict[str, str]:
        """Tied tensor name -> the name of the tensor it is."""
        return {t.name: t.tied_to for t in self.tensors if t.tied_to is not None}

    def _modules(self, section: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.module for t in self.tensors if t.section == section))

    @property
    def embedding_modules(self) -> tuple[str, ...]:
        """Modules of the embedding (before the blocks), in order."""
        return self._modules(EMBEDDING)

    @property
    def head_modules(self) -> tuple[str, ...]:
        """Modules of the head (after the blocks): final norm and output projection."""
        return self._modules(HEAD)

    def hf_names(self) -> dict[str, tuple[str, bool]]:
        """Stored hvdllm name -> (Hugging Face name, stored transposed there).

        Tensors outside the blocks come first, then each block's.
        """
        outer = [t for t in self.stored if t.block is None]
        inner = [t for t in self.stored if t.block is not None]
        return {t.name: (t.hf_name, t.hf_transposed) for t in outer + inner}

    def tp_problems(self, tp: int) -> list[str]:
        """Why ``tp`` ranks cannot split this model (one line per config key), or [].

        Args:
            tp: tensor-parallel degree.
        """
        problems = {}
        for t in self.tensors:
            if t.split.sharded and t.units is not None and t.units[1] % tp:
                key, count = t.units
                problems.setdefault(key, f"model.{key}={count} is not divisible by tp={tp} "
                                         f"(tensor parallelism splits {t.name} by it)")
        return list(problems.values())


def _block(name: str, shape: tuple[str, ...], hf_name: str, **kw: Any) -> TensorRule:
    return TensorRule(name, BLOCK, shape, hf_name=hf_name, **kw)


def _norm(name: str, hf_name: str, section: str = BLOCK) -> TensorRule:
    return TensorRule(name, section, ("d_model",), hf_name=hf_name)


_GPT = Family(
    name="gpt",
    rules=(
        TensorRule("wte.weight", EMBEDDING, ("vocab", "d_model"), "vocab", role="embedding",
                   hf_name="transformer.wte.weight"),
        TensorRule("wpe.weight", EMBEDDING, ("positions", "d_model"), role="positions",
                   hf_name="transformer.wpe.weight"),
        _norm("ln_1.weight", "ln_1.weight"),
        _norm("ln_1.bias", "ln_1.bias"),
        _block("attn.qkv.weight", ("qkv", "d_model"), "attn.c_attn.weight", split="column",
               parts=3, role="linear", units="n_head", hf_transposed=True),
        _block("attn.qkv.bias", ("qkv",), "attn.c_attn.bias", split="column", parts=3,
               role="bias", units="n_head"),
        _block("attn.proj.weight", ("d_model", "d_model"), "attn.c_proj.weight", split="row",
               role="linear", units="n_head", hf_transposed=True),
        _block("attn.proj.bias", ("d_model",), "attn.c_proj.bias", role="bias"),
        _norm("ln_2.weight", "ln_2.weight"),
        _norm("ln_2.bias", "ln_2.bias"),
        _block("mlp.fc.weight", ("ff", "d_model"), "mlp.c_fc.weight", split="column",
               role="linear", units="d_ff", hf_transposed=True),
        _block("mlp.fc.bias", ("ff",), "mlp.c_fc.bias", split="column", role="bias",
               units="d_ff"),
        _block("mlp.proj.weight", ("d_model", "ff"), "mlp.c_proj.weight", split="row",
               role="linear", units="d_ff", hf_transposed=True),
        _block("mlp.proj.bias", ("d_model",), "mlp.c_proj.bias", role="bias"),
        _norm("ln_f.weight", "transformer.ln_f.weight", HEAD),
        _norm("ln_f.bias", "transformer.ln_f.bias", HEAD),
        TensorRule("lm_head.weight", HEAD, ("vocab", "d_model"), "vocab", role="head",
                   tied_to="wte.weight", hf_name="lm_head.weight"),
    ),
    ff_default=(4, 1, 1),
    positions="learned",
    hf_model_type="gpt2",
    hf_layer_prefix="transformer.h.",
    hf_optional_prefix="transformer.",
    hf_ignored=r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",
)

_LLAMA = Family(
    name="llama",
    rules=(
        TensorRule("tok_emb.weight", EMBEDDING, ("vocab", "d_model"), "vocab", role="embedding",
                   hf_name="model.embed_tokens.weight"),
        _norm("attn_norm.weight", "input_layernorm.weight"),
        _block("attn.wq.weight", ("heads", "d_model"), "self_attn.q_proj.weight",
               split="column", role="linear", units="n_head", shared_input=True),
        _block("attn.wk.weight", ("kv", "d_model"), "self_attn.k_proj.weight",
               split="column", role="linear", units="n_kv_head", shared_input=True),
        _block("attn.wv.weight", ("kv", "d_model"), "self_attn.v_proj.weight",
               split="column", role="linear", units="n_kv_head", shared_input=True),
        _block("attn.wo.weight", ("d_model", "heads"), "self_attn.o_proj.weight", split="row",
               role="linear", units="n_head"),
        _norm("mlp_norm.weight", "post_attention_layernorm.weight"),
        _block("mlp.w_gate.weight", ("ff", "d_model"), "mlp.gate_proj.weight", split="column",
               role="linear", units="d_ff", shared_input=True),
        _block("mlp.w_up.weight", ("ff", "d_model"), "mlp.up_proj.weight", split="column",
               role="linear", units="d_ff", shared_input=True),
        _block("mlp.w_down.weight", ("d_model", "ff"), "mlp.down_proj.weight", split="row",
               role="linear", units="d_ff"),
        _norm("norm.weight", "model.norm.weight", HEAD),
        TensorRule("lm_head.weight", HEAD, ("vocab", "d_model"), "vocab", role="head",
                   hf_name="lm_head.weight"),
    ),
    ff_default=(8, 3, 64),
    positions="rotary",
    hf_model_type="llama",
    hf_layer_prefix="model.layers.",
    hf_optional_prefix="",
    hf_ignored=r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
)

FAMILIES: dict[str, Family] = {f.name: f for f in (_GPT, _LLAMA)}


def get_family(name: str) -> Family:
    """The family called ``name`` ("gpt" or "llama").

    Args:
        name: a ``model.family`` value.
    """
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; one of: "
                         f"{', '.join(FAMILIES)}") from None


def family_spec(cfg: ModelShape) -> ModelSpec:
    """Every logical tensor of the model ``cfg`` describes (a ``ModelConfig``, say).

    Args:
        cfg: anything with ``family``, ``n_layer``, ``n_head``, ``kv_heads``,
            ``d_model``, ``ff_width``, ``seq_len`` and ``vocab_size``.
    """
    return get_family(cfg.family).spec(cfg)


def default_d_ff(family: str, d_model: int) -> int:
    """The family's default MLP width: 4*d for gpt, 8/3*d rounded up to 64 for llama.

    Args:
        family: the ``model.family`` value.
        d_model: residual stream width.
    """
    return get_family(family).default_d_ff(d_model)
