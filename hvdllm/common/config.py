"""Typed configuration: dataclasses loaded from TOML plus ``--set`` overrides.

A config file has one table per dataclass below (``[model]``, ``[parallel]``,
``[train]``, ``[data]``, ``[output]``).  Every key is optional; a missing key
keeps its default.  Mistakes are caught here, at load time, with a message
that names the key:

* an unknown section or key names the nearest valid one;
* a value of the wrong type names the key and the expected type;
* values that cannot work together (a global batch that does not split
  into micro-batches, say) name every number involved.

Checks that need the world size (``dp * tp * pp == world``) live in
:mod:`hvdllm.common.topology`.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .capabilities import check_supported
from .errors import ConfigError
from .family import FAMILIES, default_d_ff, get_family

FRAMEWORKS = ("torch", "tensorflow")
MODEL_FAMILIES = tuple(FAMILIES)
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved")
PARTITIONS = ("uniform", "parameters", "balanced")
RECOMPUTE = ("none", "full")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class ModelConfig:
    """Transformer shape.

    Args:
        family: "gpt" (GPT-2: learned positions, LayerNorm, GELU, tied head)
            or "llama" (RMSNorm, rotary positions, SwiGLU, grouped-query
            attention, untied head).
        n_layer: number of transformer blocks.
        n_head: attention (query) heads; must divide d_model.
        n_kv_head: key/value heads of grouped-query attention (llama only);
            must divide n_head.  0 means n_head (plain multi-head attention).
        d_model: residual stream width.
        d_ff: hidden width of the MLP.  0 picks the family default:
            4 * d_model for gpt; for llama 8/3 * d_model rounded up to a
            multiple of 64 (as in LLaMA).
        seq_len: tokens per training sequence (the context length).
        vocab_size: vocabulary size; at least the tokenizer's (256 for bytes).
        dropout: dropout probability.  Keep 0.0 to compare layouts exactly.
        init_std: standard deviation of the normal weight initialisation.
        norm_eps: epsilon of LayerNorm (gpt) or RMSNorm (llama).
        rope_theta: base of the rotary position frequencies (llama only).
        init_from: "" (random initialisation from train.seed), or
            "hf:DIR" to load a Hugging Face checkpoint directory
            (config.json + *.safetensors), or the path of an hvdllm
            checkpoint written by ``hvdllm convert``.  The checkpoint's
            shape must match this section.
    """

    family: str = "gpt"
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int = 0
    d_model: int = 64
    d_ff: int = 0
    seq_len: int = 64
    vocab_size: int = 256
    dropout: float = 0.0
    init_std: float = 0.02
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_from: str = ""

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used (n_kv_head, or n_head when 0)."""
        return self.n_kv_head or self.n_head

    @property
    def ff_width(self) -> int:
        """MLP hidden width actually used (d_ff, or the family default)."""
        return self.d_ff or default_d_ff(self.family, self.d_model)


@dataclass
class ParallelConfig:
    """Parallel layout: world size = dp * tp * pp.

    Args:
        dp: data-parallel degree.
        tp: tensor-parallel degree (Megatron-style sharded layers; torch).
        pp: pipeline-parallel degree: the layers are cut into pp stages
            that exchange activations and gradients point-to-point.
        sequence_parallel: with tp > 1, also split the norm and dropout
            regions along the sequence (needs seq_len divisible by tp).
        schedule: pipeline schedule: "gpipe", "1f1b" or "interleaved".
        virtual_stages: model chunks per pipeline rank ("interleaved" only;
            must divide the layers per stage).
        partition: how layers are split into stages: "uniform" (by count),
            "parameters" (balance parameter counts) or "balanced" (balance
            forward+backward time measured briefly at start-up).
        recompute: "none", or "full" to recompute each stage's layers in
            backward instead of keeping their activations.
        timeout_sec: how long any rank may wait on other ranks with nothing
            moving before the job is ended with a hang report.  Waiting is
            bounded, computing is not: a slow rank never trips it, only a
            wait longer than this does.  It must exceed the longest
            legitimate wait: the slowest rank's step (its peers wait that
            long in the gradient allreduce) and start-up.  Smaller values
            free a hung allocation sooner.
        watchdog: run the per-rank hang watchdog (heartbeats, flight record,
            report and ``MPI_Abort`` on a hang).  Off, waits hvdllm polls
            still end in an error; waits inside Horovod or a TensorFlow
            graph are then unbounded.
        flight_record: communication events each rank keeps for its
            ``hang-rank-K.json``.
        mode: "sync" (every step averages all data-parallel gradients) or
            "ps": asynchronous training through a sharded parameter server
            with bounded staleness (:mod:`hvdllm.common.param_server`).  The
            world is then ``ps_servers`` server ranks (the last ones) plus
            dp x tp x pp worker ranks; dp counts the worker replicas.
        ps_servers: server ranks in "ps" mode; they hold the parameters and
            optimizer state in shards balanced by bytes.
        staleness: "ps" mode's bound s: a worker at clock c proceeds only
            when every worker has reached at least c - s (0 = synchronous).
        straggler: test knob of "ps" and "sync" modes: "R:F" slows data-parallel
            (worker) replica R by a factor F: after each step's forward and
            backward, before its gradients leave, it sleeps F - 1 times as
            long as they took.  "*:F" slows one replica per step, drawn from
            the seed and the step (a transient straggler); "" = off.
        ps_compensation: "ps" mode's answer to stale parameters: "none"
            (a worker computes on the parameters it pulled), or
            "extrapolate": a server answers a pull for clock c with
            parameters of version v moved on by (c - v) times its last
            update, a guess of the parameters of version c (weight
            prediction).  With staleness 0 (c = v) both are synchronous.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    schedule: str = "1f1b"
    virtual_stages: int = 1
    partition: str = "uniform"
    recompute: str = "none"
    timeout_sec: float = 300.0
    watchdog: bool = True
    flight_record: int = 256
    mode: str = "sync"
    ps_servers: int = 1
    staleness: int = 0
    straggler: str = ""
    ps_compensation: str = "none"


@dataclass
class TrainConfig:
    """Optimisation settings.

    Args:
        framework: "torch" or "tensorflow".
        steps: optimizer steps to run.
        global_batch_size: sequences per optimizer step, all ranks together.
        micro_batch_size: sequences per rank per forward pass.  Gradient
            accumulation steps = global_batch_size / (micro_batch_size * dp).
        lr: peak learning rate of AdamW.
        warmup_steps: linear warm-up steps before the peak learning rate.
        lr_schedule: after warm-up, "constant" keeps ``lr``; "cosine" and
            "linear" decay it from ``lr`` to ``min_lr`` at ``steps``.
        min_lr: the learning rate "cosine" and "linear" reach at the last
            step; at most ``lr``.
        eval_every: compute the validation loss every this many steps and
            at the last step (0 = never); needs ``data.val_fraction`` or
            ``data.val_path``.
        eval_batches: global batches of validation windows per evaluation,
            taken in order from the start of the validation set.
        peak_flops: FLOP/s of one rank, the denominator of the logged
            ``mfu``; 0 picks it: a known GPU's dense bf16 peak, else a
            float32 matmul timed at start-up.
        weight_decay: AdamW decoupled weight decay (matrices only).
        beta1, beta2, eps: AdamW constants.
        seed: seed of the weight initialisation and the data order.
        log_every: write a metrics line every this many steps.
        sample_tokens: tokens of text to generate at the end (0 = none).
        optimizer: "adamw", or "sgd" (with ``momentum``; weight decay as L2).
        momentum: SGD momentum.
        compression: gradient compression on the data-parallel wire: "none",
            "fp16", "bf16" (16-bit on the wire), "topk" (largest
            ``topk_ratio`` fraction, error feedback) or "powersgd"
            (rank ``powersgd_rank``, error feedback, warm start).  torch.
        topk_ratio: fraction of gradient entries "topk" sends, in (0, 1].
        compression_warmup_steps: warm-up of "topk" (starts sending 25% of
            the entries and shrinks to ``topk_ratio`` over this many steps)
            and "powersgd" (averages uncompressed for this many steps);
            0 = none.  With ``compression_target = "momentum"``: plain AdamW
            steps, averaged uncompressed, before ``v`` is frozen.
        compression_target: what the compressor sends: "gradient", or
            "momentum" (1-bit Adam's scheme: after the warm-up AdamW's
            second moment is frozen and each rank's momentum is compressed
            and averaged; AdamW and torch only).
        powersgd_rank: rank of the PowerSGD approximation, >= 1.
        reduce_op: how the data-parallel group combines gradients with
            ``compression = "none"``: "average" (the mean), or "adasum"
            (Horovod's Adasum, which adds orthogonal parts and averages
            parallel ones; dp must be a power of two).
        zero: 1 shards AdamW state and fp32 master weights over the DP
            group (ZeRO stage 1); 0 keeps them replicated.  torch.
        precision: "fp32", "bf16" (autocast, fp32 master weights) or "fp16"
            (autocast with dynamic loss scaling agreed by all ranks).  torch.
        grad_clip: clip the global gradient norm (over dp x tp x pp) to this
            value; 0 = off.  torch.
        profile_steps: ``[first, last]`` records, on every rank, when each
            phase of optimizer steps first..last ran (forward, backward, each
            wait on other ranks, the optimizer, checkpoint staging) into
            ``output.dir/profile/rank-K.json``; ``hvdllm timeline`` merges
            them.  ``[]`` = off.
        horovod_timeline: also record Horovod's own timeline
            (``HOROVOD_TIMELINE``) into ``output.dir/profile/``, merged by
            ``hvdllm timeline`` too.
        resume: "auto" continues from the newest complete checkpoint in
            ``output.dir`` (or starts afresh when there is none); "never"
            starts afresh; a path resumes from that checkpoint (a step
            directory, or a directory of them: the newest usable one).
    """

    framework: str = "torch"
    steps: int = 20
    global_batch_size: int = 8
    micro_batch_size: int = 2
    lr: float = 1e-3
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr: float = 0.0
    eval_every: int = 0
    eval_batches: int = 8
    peak_flops: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    seed: int = 1234
    log_every: int = 1
    sample_tokens: int = 0
    optimizer: str = "adamw"
    momentum: float = 0.9
    compression: str = "none"
    topk_ratio: float = 0.01
    compression_warmup_steps: int = 0
    compression_target: str = "gradient"
    powersgd_rank: int = 4
    reduce_op: str = "average"
    zero: int = 0
    precision: str = "fp32"
    grad_clip: float = 0.0
    profile_steps: list[int] = field(default_factory=list)
    horovod_timeline: bool = False
    resume: str = "auto"


@dataclass
class DataConfig:
    """Training text.

    Args:
        path: a text file or a directory of text files, or a corpus
            directory written by ``hvdllm prepare`` (memory-mapped, for
            corpora larger than memory).  "" selects the bundled corpus
            (Python's own documentation).
        tokenizer: "bytes" (UTF-8 bytes, vocabulary 256), or a Hugging Face
            ``tokenizer.json`` or a directory holding one (``hvdllm
            tokenizer train`` writes one).  ``model.vocab_size`` must hold
            its vocabulary; a prepared corpus must have been made with it.
        val_fraction: hold out this tail fraction of the corpus tokens as
            the validation set, in [0, 1); the training windows are cut
            from the rest.
        val_path: a separate validation text file or directory (read like
            ``path``); not together with ``val_fraction``.
    """

    path: str = ""
    tokenizer: str = "bytes"
    val_fraction: float = 0.0
    val_path: str = ""


@dataclass
class OutputConfig:
    """Where the run writes ``metrics.jsonl``, ``config.toml`` and its checkpoints.

    Args:
        dir: output directory (created if missing).
        checkpoint: at the end of training, write a training checkpoint to
            ``dir/checkpoints/step-N`` (convert it with ``hvdllm convert
            --to-hf``, or start from it with ``model.init_from``).
        checkpoint_every: also write one every this many steps (0 = only
            at the end).  Saves run in the background.
        keep_checkpoints: how many complete checkpoints to keep, newest first.
    """

    dir: str = "runs/example"
    checkpoint: bool = True
    checkpoint_every: int = 0
    keep_checkpoints: int = 2


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per rank per optimizer step."""
        t, p = self.train, self.parallel
        return t.global_batch_size // (t.micro_batch_size * p.dp)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _field_types(section_cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _nearest(name: str, choices: Iterable[str]) -> str | None:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return match[0] if match else None


def _unknown_key_message(section: str, key: str) -> str:
    sections = _section_types()
    valid = _field_types(sections[section])
    msg = f"unknown config key '{section}.{key}'"
    near = _nearest(key, valid)
    if near is None:
        # The key may belong to another section.
        for other, cls in sections.items():
            if key in _field_types(cls):
                near_full = f"{other}.{key}"
                break
        else:
            near_full = None
    else:
        near_full = f"{section}.{near}"
    if near_full:
        msg += f"; did you mean '{near_full}'?"
    else:
        msg += f"; valid keys in [{section}]: {', '.join(valid)}"
    return msg


def _coerce(section: str, key: str, value: Any, expected: type, raw: str | None) -> Any:
    """Check ``value`` against ``expected``; ``raw`` is the --set text, if any."""
    name = f"{section}.{key}"
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
        if raw is not None:
            # `--set data.path=123` means the string "123".
            return raw
    elif typing.get_origin(expected) is list:
        (item,) = typing.get_args(expected)
        if isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool)
                                           for v in value):
            return list(value)
        got = type(value).__name__
        raise ConfigError(f"config key '{name}' expects a list of {item.__name__}, got {got} "
                          f"{value!r}")
    got = type(value).__name__
    raise ConfigError(
        f"config key '{name}' expects {expected.__name__}, got {got} {value!r}"
    )


def _parse_override(item: str) -> tuple[str, str, Any, str]:
    if "=" not in item:
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    path, raw = item.split("=", 1)
    path = path.strip()
    if path.count(".") != 1 or not all(path.split(".")):
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    section, key = path.split(".")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words are strings: --set train.framework=torch
    return section, key, value, raw


def _apply(cfg_dict: dict[str, dict[str, Any]], section: str, key: str, value: Any,
           raw: str | None) -> None:
    sections = _section_types()
    if section not in sections:
        near = _nearest(section, sections)
        hint = f"; did you mean [{near}]?" if near else ""
        raise ConfigError(
            f"unknown config section [{section}]{hint} valid sections: {', '.join(sections)}"
        )
    types = _field_types(sections[section])
    if key not in types:
        raise ConfigError(_unknown_key_message(section, key))
    cfg_dict[section][key] = _coerce(section, key, value, types[key], raw)


def build_config(data: Mapping[str, Any] | None = None,
                 overrides: Iterable[str] = ()) -> Config:
    """Build and validate a :class:`Config` from a TOML-shaped dict and ``--set`` items."""
    base = Config().to_dict()
    for section, table in (data or {}).items():
        if not isinstance(table, Mapping):
            sections = _section_types()
            if section in sections:
                raise ConfigError(f"config section [{section}] must be a table, got {table!r}")
            near = None
            for name, cls in sections.items():
                if section in _field_types(cls):
                    near = f"{name}.{section}"
            hint = f"; did you mean '{near}' under [{near.split('.')[0]}]?" if near else ""
            raise ConfigError(f"unknown top-level config key '{section}'{hint}")
        for key, value in table.items():
            _apply(base, section, key, value, None)
    for item in overrides:
        section, key, value, raw = _parse_override(item)
        _apply(base, section, key, value, raw)
    cfg = Config(**{name: cls(**base[name]) for name, cls in _section_types().items()})
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> Config:
    """Load a TOML file (or defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    return build_config(data, overrides)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"config key '{name}' must be > 0, got {value}")


def validate(cfg: Config) -> None:
    """Check values and their combinations; raise :class:`ConfigError`."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if t.framework not in FRAMEWORKS:
        near = _nearest(t.framework, FRAMEWORKS)
        hint = f" (did you mean '{near}'?)" if near else ""
        raise ConfigError(
            f"unknown train.framework '{t.framework}'{hint}; choose one of: {', '.join(FRAMEWORKS)}"
        )
    if m.family not in MODEL_FAMILIES:
        near = _nearest(m.family, MODEL_FAMILIES)
        hint = f" (did you mean '{near}'?)" if near else ""
        raise ConfigError(
            f"unknown model.family '{m.family}'{hint}; choose one of: {', '.join(MODEL_FAMILIES)}"
        )
    for name in ("n_layer", "n_head", "d_model", "seq_len", "vocab_size"):
        _positive(f"model.{name}", getattr(m, name))
    for name in ("n_kv_head", "d_ff"):
        if getattr(m, name) < 0:
            raise ConfigError(f"config key 'model.{name}' must be >= 0 (0 = default), "
                              f"got {getattr(m, name)}")
    if m.d_model % m.n_head:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.n_head={m.n_head}"
        )
    family = get_family(m.family)
    if m.n_kv_head and not family.grouped_query and m.n_kv_head != m.n_head:
        grouped = [f.name for f in FAMILIES.values() if f.grouped_query]
        raise ConfigError(
            f"model.n_kv_head={m.n_kv_head}: grouped-query attention is a "
            f"{'/'.join(grouped)} feature; the {m.family} family uses n_kv_head = n_head = "
            f"{m.n_head} (or 0)"
        )
    if m.n_head % m.kv_heads:
        raise ConfigError(
            f"model.n_kv_head={m.kv_heads} does not divide model.n_head={m.n_head}"
        )
    if family.positions == "rotary" and (m.d_model // m.n_head) % 2:
        raise ConfigError(
            f"{m.family} needs an even head size for rotary embeddings; d_model={m.d_model} / "
            f"n_head={m.n_head} = {m.d_model // m.n_head}"
        )
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.rope_theta", m.rope_theta)
    _validate_tokenizer(cfg)
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    _positive("model.init_std", m.init_std)
    for name in ("dp", "tp", "pp"):
        _positive(f"parallel.{name}", getattr(p, name))
    _positive("parallel.timeout_sec", p.timeout_sec)
    _positive("parallel.flight_record", p.flight_record)
    _validate_tensor_parallel(cfg)
    _validate_pipeline(cfg)
    _validate_parameter_server(cfg)
    _validate_data_parallel_depth(cfg)
    check_supported(cfg)  # what the chosen framework's adapter declares it runs
    for name in ("steps", "global_batch_size", "micro_batch_size", "log_every"):
        _positive(f"train.{name}", getattr(t, name))
    _positive("train.lr", t.lr)
    for name in ("warmup_steps", "sample_tokens"):
        if getattr(t, name) < 0:
            raise ConfigError(f"config key 'train.{name}' must be >= 0, got {getattr(t, name)}")
    if t.weight_decay < 0:
        raise ConfigError(f"train.weight_decay must be >= 0, got {t.weight_decay}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(t, name) < 1.0:
            raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(t, name)}")
    _positive("train.eps", t.eps)
    _validate_schedule_and_eval(cfg)
    _validate_profile(cfg)
    if not t.resume:
        raise ConfigError('train.resume must be "auto", "never" or a checkpoint path, got ""')
    o = cfg.output
    if o.checkpoint_every < 0:
        raise ConfigError(f"output.checkpoint_every must be >= 0 (0 = only at the end), "
                          f"got {o.checkpoint_every}")
    _positive("output.keep_checkpoints", o.keep_checkpoints)
    per_step = t.micro_batch_size * p.dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size} x parallel.dp={p.dp} (= {per_step})"
        )


def _validate_profile(cfg: Config) -> None:
    steps = cfg.train.profile_steps
    if not steps:
        return
    if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
        raise ConfigError(f"train.profile_steps must be [first, last] with 1 <= first <= last "
                          f"(or [] for off), got {steps}")
    if steps[0] > cfg.train.steps:
        raise ConfigError(f"train.profile_steps = {steps} starts after the last step "
                          f"(train.steps = {cfg.train.steps})")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        near = _nearest(value, choices)
        hint = f" (did you mean '{near}'?)" if near else ""
        raise ConfigError(f"unknown {name} '{value}'{hint}; choose one of: {', '.join(choices)}")


def _validate_schedule_and_eval(cfg: Config) -> None:
    """Learning-rate schedule, validation set and evaluation cadence, MFU peak."""
    t, d = cfg.train, cfg.data
    _choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    if not 0.0 <= t.min_lr <= t.lr:
        raise ConfigError(f"train.min_lr must be in [0, train.lr = {t.lr:g}], got {t.min_lr:g}")
    if not 0.0 <= t.peak_flops < math.inf:
        raise ConfigError(f"train.peak_flops must be >= 0 (0 = auto), got {t.peak_flops:g}")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction:g}")
    if d.val_fraction > 0 and d.val_path:
        raise ConfigError(f"set data.val_fraction ({d.val_fraction:g}) or data.val_path "
                          f"({d.val_path!r}), not both")
    if t.eval_every < 0:
        raise ConfigError(f"train.eval_every must be >= 0 (0 = never), got {t.eval_every}")
    _positive("train.eval_batches", t.eval_batches)
    if t.eval_every and not (d.val_fraction > 0 or d.val_path):
        raise ConfigError(f"train.eval_every = {t.eval_every} needs a validation set: set "
                          f"data.val_fraction or data.val_path")


def _validate_data_parallel_depth(cfg: Config) -> None:
    """Optimizer, compression, ZeRO, precision and clipping settings."""
    from .compression import check_compression, check_compression_target, check_reduce_op
    from .loss_scale import check_precision
    from .zero import check_zero

    t = cfg.train
    _choice("train.optimizer", t.optimizer, OPTIMIZERS)
    if not 0.0 <= t.momentum < 1.0:
        raise ConfigError(f"train.momentum must be in [0, 1), got {t.momentum}")
    check_compression(t.compression, t.topk_ratio, t.powersgd_rank)
    if t.compression_warmup_steps < 0:
        raise ConfigError(f"train.compression_warmup_steps must be >= 0, got {t.compression_warmup_steps}")
    check_compression_target(t.compression_target, t.compression, t.optimizer, t.framework)
    check_precision(t.precision)
    check_zero(t.zero, t.compression, t.optimizer)
    check_reduce_op(t.reduce_op, t.compression, t.zero, cfg.parallel.dp)
    if not t.grad_clip >= 0:
        raise ConfigError(f"train.grad_clip must be >= 0 (0 = off), got {t.grad_clip}")


def _validate_pipeline(cfg: Config) -> None:
    """Stage and chunk counts must fit the layers; names must be known."""
    m, p = cfg.model, cfg.parallel
    _choice("parallel.schedule", p.schedule, PIPELINE_SCHEDULES)
    _choice("parallel.partition", p.partition, PARTITIONS)
    _choice("parallel.recompute", p.recompute, RECOMPUTE)
    _positive("parallel.virtual_stages", p.virtual_stages)
    if p.pp > m.n_layer:
        raise ConfigError(
            f"parallel.pp={p.pp} is greater than model.n_layer={m.n_layer}: every pipeline "
            f"stage needs at least one layer")
    if p.virtual_stages > 1:
        if p.schedule != "interleaved":
            raise ConfigError(
                f"parallel.virtual_stages={p.virtual_stages} needs parallel.schedule = "
                f"'interleaved' (got '{p.schedule}')")
        if m.n_layer % p.pp or (m.n_layer // p.pp) % p.virtual_stages:
            raise ConfigError(
                f"parallel.virtual_stages={p.virtual_stages} must divide the layers per stage: "
                f"model.n_layer={m.n_layer} / parallel.pp={p.pp} = {m.n_layer / p.pp:g}")
    t = cfg.train
    per_step = t.micro_batch_size * p.dp
    if p.virtual_stages > 1 and t.global_batch_size % per_step == 0:
        micro = t.global_batch_size // per_step
        if micro % p.pp:
            raise ConfigError(
                f"the interleaved schedule needs the micro-batches per step to divide by "
                f"parallel.pp: global_batch_size={t.global_batch_size} / (micro_batch_size="
                f"{t.micro_batch_size} x dp={p.dp}) = {micro} micro-batches, pp={p.pp}")


PARALLEL_MODES = ("sync", "ps")
PS_COMPENSATIONS = ("none", "extrapolate")


def straggle(factor: float, began: float) -> None:
    """The ``parallel.straggler`` knob: having computed since ``began``
    (``time.perf_counter()``), sleep ``factor - 1`` times as long."""
    if factor > 1.0:
        import time

        time.sleep((factor - 1.0) * (time.perf_counter() - began))


def parse_straggler(value: str) -> tuple[int, float] | None:
    """``parallel.straggler`` "R:F" as (replica R, factor F), "*:F" as (-1, F); None when off."""
    if not value:
        return None
    try:
        replica, factor = value.split(":")
        out = (-1 if replica.strip() == "*" else int(replica)), float(factor)
    except ValueError:
        raise ConfigError(f'parallel.straggler must be "REPLICA:FACTOR" or "*:FACTOR" (e.g. '
                          f'"1:2"), got {value!r}') from None
    if out[0] < -1 or not out[1] >= 1.0:
        raise ConfigError(f"parallel.straggler {value!r}: the replica must be >= 0 (or *) and "
                          f"the factor >= 1")
    return out


def slow_factor(straggler: tuple[int, float] | None, replica: int, dp: int, seed: int,
                step: int) -> float:
    """How many times as long ``replica``'s step ``step`` takes under the knob:
    a named replica always, "*" one replica per step, drawn from the seed and
    the step (the same draw on every rank)."""
    if straggler is None:
        return 1.0
    slowed = straggler[0]
    if slowed < 0:
        import numpy as np

        slowed = int(np.random.default_rng([seed, 104729, step]).integers(dp))
    return straggler[1] if slowed == replica else 1.0


def _validate_parameter_server(cfg: Config) -> None:
    """``parallel.mode`` and what "ps" mode supports."""
    p, t = cfg.parallel, cfg.train
    _choice("parallel.mode", p.mode, PARALLEL_MODES)
    _choice("parallel.ps_compensation", p.ps_compensation, PS_COMPENSATIONS)
    straggler = parse_straggler(p.straggler)
    if straggler is not None and straggler[0] >= p.dp:
        raise ConfigError(f"parallel.straggler {p.straggler!r} names replica {straggler[0]}, "
                          f"but there are dp={p.dp} replicas (0..{p.dp - 1})")
    if p.mode != "ps":
        return
    if p.ps_servers < 1:
        raise ConfigError(f"parallel.ps_servers must be >= 1 in ps mode, got {p.ps_servers}")
    if t.resume not in ("auto", "never"):
        raise ConfigError(f'parallel.mode = "ps" resumes from its servers\' checkpoints in '
                          f'output.dir: train.resume must be "auto" or "never", got {t.resume!r}')
    if p.staleness < 0:
        raise ConfigError(f"parallel.staleness must be >= 0, got {p.staleness}")
    unsupported = [(t.zero, "train.zero = 0"), (t.compression != "none",
                   'train.compression = "none"'), (t.precision != "fp32",
                   'train.precision = "fp32"'), (t.grad_clip > 0, "train.grad_clip = 0"),
                   (t.eval_every > 0, "train.eval_every = 0")]
    for bad, need in unsupported:
        if bad:
            raise ConfigError(f'parallel.mode = "ps" needs {need}: the servers run a plain '
                              f"fp32 optimizer on their shards")


def check_ps_world(cfg: Config, world_size: int) -> None:
    """In "ps" mode the world is ``ps_servers`` + dp x tp x pp; raise if not."""
    p = cfg.parallel
    workers = p.dp * p.tp * p.pp
    if p.ps_servers >= world_size:
        raise ConfigError(f"parallel.ps_servers = {p.ps_servers} leaves no worker: the world "
                          f"has {world_size} ranks")
    if p.ps_servers + workers != world_size:
        raise ConfigError(f"parallel.ps_servers = {p.ps_servers} plus dp={p.dp} x tp={p.tp} x "
                          f"pp={p.pp} = {workers} worker ranks is {p.ps_servers + workers}, but "
                          f"the job has world size {world_size}")


def _validate_tokenizer(cfg: "Config") -> None:
    """``model.vocab_size`` holds ``data.tokenizer``'s vocabulary (and a prepared
    corpus's, made with the same tokenizer: checked when the corpus is opened)."""
    from .tokenizer import check_vocab, load_tokenizer

    check_vocab(load_tokenizer(cfg.data.tokenizer), cfg.model.vocab_size)


def _validate_tensor_parallel(cfg: Config) -> None:
    """Every sharded dimension must split evenly over parallel.tp."""
    m, p = cfg.model, cfg.parallel
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel = true needs parallel.tp > 1")
    if p.tp == 1:
        return
    for key, value in (("n_head", m.n_head), ("n_kv_head", m.kv_heads), ("d_ff", m.ff_width)):
        if value % p.tp:
            raise ConfigError(
                f"model.{key}={value} is not divisible by parallel.tp={p.tp}: tensor "
                f"parallelism gives each rank an equal share of it"
            )
    if p.sequence_parallel and m.seq_len % p.tp:
        raise ConfigError(
            f"parallel.sequence_parallel needs model.seq_len divisible by parallel.tp, got "
            f"seq_len={m.seq_len} and tp={p.tp}"
        )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(cfg: Config) -> str:
    """Serialise a config to TOML text that :func:`load_config` reads back."""
    lines: list[str] = []
    for section, table in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)
