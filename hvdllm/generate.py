"""``hvdllm generate``: continue a prompt from a checkpoint, in one process.

The checkpoint is a training checkpoint (``output.dir/checkpoints/step-N``,
its ``checkpoints`` directory or the run's ``output.dir``, written by any
dp x tp x pp layout and either framework; its shards are assembled into full
tensors) or an hvdllm model checkpoint (``model.toml`` + ``model.safetensors``,
e.g. from ``hvdllm convert --from-hf``).  No MPI or Horovod is involved.

Decoding runs the prompt through the model once, then one token per step
against the cached keys and values of every block.  When the context would
pass ``model.seq_len`` tokens, the cache is dropped and each further step
recomputes it from the last ``seq_len`` tokens (a sliding window, the same
context the uncached model sees), so long outputs work, only slower.

Sampling is framework-free (:func:`sample_next`): temperature 0 picks the
most likely token, otherwise the logits are divided by the temperature,
cut to the ``top_k`` most likely (0: all) and sampled with a numpy
generator seeded by ``seed``; the same logits give the same tokens in both
frameworks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .common.config import ModelConfig
from .common.errors import CheckpointError, ConfigError, DataError

FRAMEWORKS = ("torch", "tensorflow")

#: ``step(tokens, cache) -> (logits of the last token, cache)``; cache None: start afresh.
StepFn = Callable[[Sequence[int], object], tuple[np.ndarray, object]]


@dataclass
class Source:
    """A checkpoint read for generation.

    Attributes:
        model: its model section.
        tensors: full logical tensors by name.
        framework: the framework that wrote it (None: not recorded).
        tokenizer: ``data.tokenizer`` of the run that wrote it (None: not recorded).
    """

    model: ModelConfig
    tensors: dict[str, np.ndarray]
    framework: str | None
    tokenizer: str | None


def read_source(path: str | Path) -> Source:
    """Read a training or model checkpoint directory (see the module docstring)."""
    from .common.checkpoint import CONFIG_FILE, load_checkpoint
    from .common.train_checkpoint import is_training_checkpoint, newest_usable

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint directory {p} not found")
    framework = tokenizer = None
    if not (p / CONFIG_FILE).is_file():
        if not is_training_checkpoint(p):
            raise CheckpointError(f"{p} is not an hvdllm checkpoint: neither a training "
                                  f"checkpoint (manifest.json) nor a model checkpoint "
                                  f"({CONFIG_FILE})")
        found = newest_usable(p)
        if found is None:
            raise CheckpointError(f"{p} holds no usable training checkpoint")
        config = found[1].get("config", {})
        framework = config.get("train", {}).get("framework")
        tokenizer = config.get("data", {}).get("tokenizer")
    cfg, tensors = load_checkpoint(p)
    return Source(cfg, dict(tensors), framework, tokenizer)


def check_options(max_new_tokens: int, temperature: float, top_k: int) -> None:
    """Raise ConfigError for a negative token count, temperature or top-k."""
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:  # also catches nan
        raise ConfigError(f"--temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0: no cut), got {top_k}")


def sample_next(logits: np.ndarray, rng: np.random.Generator, temperature: float,
                top_k: int) -> int:
    """The next token from one position's logits (vocab,).

    Args:
        logits: scores over the vocabulary.
        rng: the sampler's generator (unused when greedy).
        temperature: 0 = argmax; otherwise divides the logits.
        top_k: sample among the ``top_k`` most likely only (0: all).
    """
    logits = np.asarray(logits, np.float64).reshape(-1)
    if temperature == 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if 0 < top_k < logits.size:
        kth = np.sort(logits)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    return int(rng.choice(logits.size, p=probs / probs.sum()))


def decode(step: StepFn, prompt: Sequence[int], max_new_tokens: int, seq_len: int,
           temperature: float = 0.0, top_k: int = 0, seed: int = 0,
           use_cache: bool = True) -> list[int]:
    """Prompt + ``max_new_tokens`` tokens, decoded with a key/value cache.

    Args:
        step: the model (see :data:`StepFn`).
        prompt: token ids (at least one).
        max_new_tokens: tokens to append.
        seq_len: the model's longest context; longer contexts slide.
        temperature, top_k, seed: the sampler's settings (see :func:`sample_next`).
        use_cache: False recomputes the whole window at every step (a reference).
    """
    tokens = [int(t) for t in prompt]
    if not tokens:
        raise DataError("the prompt is empty: give at least one token")
    rng = np.random.default_rng(seed)
    cache, held = None, 0
    for _ in range(max_new_tokens):
        if cache is not None and use_cache and held < seq_len:
            logits, cache = step(tokens[-1:], cache)
            held += 1
        else:  # the first step, a full window, or no cache: recompute
            window = tokens[-seq_len:]
            logits, cache = step(window, None)
            held = len(window)
        tokens.append(sample_next(logits, rng, temperature, top_k))
    return tokens


# -- the two frameworks -----------------------------------------------------------


def torch_step(model_cfg: ModelConfig, tensors: dict[str, np.ndarray],
               use_cache: bool = True) -> StepFn:
    """A :data:`StepFn` over a plain PyTorch reference model filled with ``tensors``.

    Args:
        use_cache: False: every call runs the ordinary forward over the tokens
            given (the cache argument is ignored).
    """
    import torch

    from .torch.models import model_from_config

    model = model_from_config(model_cfg).eval()
    # load_checkpoint checked the names and shapes; GPT's tied head appears once, as wte.
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(np.array(tensors[name], np.float32)))

    @torch.no_grad()
    def step(tokens: Sequence[int], cache: object) -> tuple[np.ndarray, object]:
        idx = torch.tensor([list(tokens)], dtype=torch.long)
        if use_cache:
            logits, cache = model.forward_cached(idx, cache)
        else:
            logits = model(idx)
        logits = model.criterion.full_logits(logits)[0, -1]
        return logits.float().numpy(), cache

    return step


def tensorflow_step(model_cfg: ModelConfig, tensors: dict[str, np.ndarray],
                    use_cache: bool = True) -> StepFn:
    """A :data:`StepFn` over a Keras reference model filled with ``tensors`` (see :func:`torch_step`)."""
    from keras import ops

    from .common.family import family_spec
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    from .tensorflow.models import MODEL_CLASSES
    from .tensorflow.state import assign_logical

    model = MODEL_CLASSES[model_cfg.family].from_model_config(model_cfg)
    model.build((None, model_cfg.seq_len))
    assign_logical(model, family_spec(model_cfg), tensors, "the checkpoint")

    def step(tokens: Sequence[int], cache: object) -> tuple[np.ndarray, object]:
        idx = np.asarray([list(tokens)], np.int64)
        if use_cache:
            logits, cache = model.call_cached(idx, cache)
        else:
            logits = model(idx, training=False)
        logits = ops.convert_to_numpy(model.criterion.full_logits(logits))[0, -1]
        return logits.astype(np.float32), cache

    return step


def model_step(framework: str, model_cfg: ModelConfig, tensors: dict[str, np.ndarray],
               use_cache: bool = True) -> StepFn:
    """The :data:`StepFn` of ``framework`` ("torch" or "tensorflow")."""
    if framework == "torch":
        return torch_step(model_cfg, tensors, use_cache)
    if framework == "tensorflow":
        return tensorflow_step(model_cfg, tensors, use_cache)
    raise ConfigError(f"unknown framework {framework!r}; choose one of: {', '.join(FRAMEWORKS)}")


def generate_tokens(source: Source, prompt: Sequence[int], max_new_tokens: int,
                    temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                    framework: str | None = None, use_cache: bool = True) -> list[int]:
    """Prompt + generated token ids from a checkpoint read by :func:`read_source`.

    Args:
        framework: "torch" or "tensorflow" (None: the checkpoint's own, else torch).
    """
    check_options(max_new_tokens, temperature, top_k)
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise DataError("the prompt is empty: give at least one token")
    vocab = source.model.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise DataError(f"prompt token {bad[0]} is outside the model's vocabulary of {vocab} "
                        f"(a different tokenizer?)")
    step = model_step(framework or source.framework or "torch", source.model, source.tensors,
                      use_cache)
    return decode(step, prompt, max_new_tokens, source.model.seq_len, temperature, top_k,
                  seed, use_cache)


def generate_text(checkpoint: str | Path, prompt: str, max_new_tokens: int = 64,
                  temperature: float = 0.8, top_k: int = 40, seed: int = 0,
                  framework: str | None = None, tokenizer: str | None = None) -> str:
    """The prompt and its continuation, as text (what ``hvdllm generate`` prints).

    Args:
        checkpoint: a training or model checkpoint directory.
        prompt: the text to continue (not empty).
        max_new_tokens, temperature, top_k, seed: see :func:`decode`.
        framework: "torch" or "tensorflow" (None: the checkpoint's own, else torch).
        tokenizer: a ``data.tokenizer`` spec (None: the checkpoint's run's, else "bytes").
    """
    from .common.tokenizer import load_tokenizer

    check_options(max_new_tokens, temperature, top_k)
    if framework is not None and framework not in FRAMEWORKS:
        raise ConfigError(f"unknown --framework {framework!r}; choose one of: "
                          f"{', '.join(FRAMEWORKS)}")
    if not prompt:
        raise DataError("the prompt is empty: give some text to continue")
    source = read_source(checkpoint)
    try:
        tok = load_tokenizer(tokenizer or source.tokenizer or "bytes")
    except ConfigError as exc:
        where = "--tokenizer" if tokenizer else f"the checkpoint's tokenizer ({checkpoint})"
        raise ConfigError(f"{where}: {exc}") from None
    ids = tok.encode(prompt)
    if len(ids) == 0:
        raise DataError("the prompt encodes to no tokens")
    tokens = generate_tokens(source, ids.tolist(), max_new_tokens, temperature, top_k, seed,
                             framework)
    return tok.decode(tokens)
