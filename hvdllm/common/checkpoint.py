"""hvdllm's own checkpoint format, framework-free (numpy only).

A checkpoint is a directory with two files:

* ``model.toml``: the ``[model]`` section of the config the weights belong
  to (every key but ``init_from``), loadable with the usual config machinery;
* ``model.safetensors``: every parameter as one full, unsharded tensor, keyed
  by hvdllm's parameter names (those of the PyTorch reference models, see
  :func:`parameter_shapes`).  GPT's output head is tied to the token
  embedding, so only ``wte.weight`` is stored.

A checkpoint is written into a temporary sibling directory and renamed into
place only when complete, so a crash never leaves a half-written checkpoint
under the target name.  Reading checks every tensor's name and shape against
``model.toml`` and names each mismatch.

The safetensors reader here is a small parser of the format (an 8-byte
header length, a JSON header, raw little-endian data) rather than
``safetensors.numpy``, because numpy has no bfloat16 and most Hugging Face
checkpoints are stored in it: bfloat16 tensors are widened to float32.
Tensors are memory-mapped, so reading a header costs nothing and a tensor's
bytes are read only when used.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from .config import ModelConfig, _toml_value, build_config
from .errors import CheckpointError, ConfigError
from .family import family_spec

TENSORS_FILE = "model.safetensors"
CONFIG_FILE = "model.toml"

# safetensors dtype codes -> little-endian numpy dtypes (BF16 is read as raw uint16).
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8",
           "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
_MAX_HEADER = 100 * 1024 * 1024
_MAX_PROBLEMS = 8

Shape = tuple[int, ...]


def parameter_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    """Name -> shape of every stored parameter of the reference model for ``cfg``, in model order.

    Tied tensors are left out (GPT's ``lm_head.weight`` is ``wte.weight``);
    the names and shapes come from :func:`hvdllm.common.family.family_spec`.

    Args:
        cfg: the model section of a config.
    """
    return family_spec(cfg).shapes()


def _fmt(shape: Shape) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"


def check_tensors(found: Mapping[str, Shape], expected: Mapping[str, Shape], where: str) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected or misshapen tensor.

    Args:
        found: name -> shape of the tensors a checkpoint holds.
        expected: name -> shape the model config calls for.
        where: what is being checked, for the message (a path, say).
    """
    problems = []
    for name, shape in expected.items():
        if name not in found:
            problems.append(f"tensor '{name}': expected shape {_fmt(shape)}, found none (missing)")
        elif tuple(found[name]) != tuple(shape):
            problems.append(f"tensor '{name}': expected shape {_fmt(shape)}, "
                            f"found {_fmt(tuple(found[name]))}")
    for name in found:
        if name not in expected:
            problems.append(f"tensor '{name}': expected none (unexpected), "
                            f"found shape {_fmt(tuple(found[name]))}")
    if problems:
        more = len(problems) - _MAX_PROBLEMS
        text = "; ".join(problems[:_MAX_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")
        raise CheckpointError(f"{where} does not match its model config: {text}")


def drop_tied_head(cfg: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``tensors`` without tied tensors (GPT's ``lm_head.weight``, which must equal ``wte.weight``).

    Args:
        cfg: the model section; its family says which tensors are tied.
        tensors: hvdllm-named tensors, e.g. a full state dict.
    """
    out = dict(tensors)
    for name, source in family_spec(cfg).ties.items():
        if name not in out:
            continue
        tied = out.pop(name)
        kept = out.get(source)
        if kept is None or not np.array_equal(tied, kept):
            raise CheckpointError(f"{cfg.family}'s {name} is tied to {source}, but the tensors "
                                  f"given differ (or {source} is missing)")
    return out


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a ``.safetensors`` file (bfloat16 widened to float32).

    Args:
        path: the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = int.from_bytes(prefix, "little")
            if len(prefix) < 8 or n > min(size - 8, _MAX_HEADER):
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a valid safetensors file (header is not a table)")
    start = 8 + n
    data = (np.memmap(path, dtype=np.uint8, mode="r", offset=start) if size > start
            else np.zeros(0, np.uint8))
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]])
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{name}' has an unsupported or malformed "
                                  f"entry {info!r}") from None
        if not 0 <= begin <= end <= data.size or end - begin != dtype.itemsize * int(
                np.prod(shape, dtype=np.int64)):
            raise CheckpointError(f"{path}: tensor '{name}' of shape {_fmt(shape)} does not fit "
                                  f"its byte range [{begin}, {end}) (file truncated?)")
        array = data[begin:end].view(dtype).reshape(shape)
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = array
    return tensors


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` with ``safetensors.numpy`` and flush it to disk.

    Args:
        path: the file to write.
        tensors: name -> array.
        metadata: optional string metadata stored in the header.
    """
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata)
    os.chmod(path, 0o666 & ~_umask())  # safetensors creates the file private
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_synced(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` and flush it to disk.

    Args:
        path: the file to write.
        text: its contents.
    """
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` only if the block succeeds.

    ``target`` must not exist or be an empty directory: nothing is overwritten.

    Args:
        target: the directory to create.
    """
    target = Path(target)
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise CheckpointError(f"{target} already exists and is not an empty directory; "
                              f"choose another output path or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a checkpoint is not
    try:
        yield tmp
        _fsync_dir(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)


def model_config_toml(cfg: ModelConfig) -> str:
    """The ``[model]`` section for ``cfg`` (without ``init_from``) as TOML text.

    Args:
        cfg: the model section to write.
    """
    lines = ["[model]"]
    for key, value in dataclasses.asdict(cfg).items():
        if key != "init_from":
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def parse_model_config(data: Mapping, where: str) -> ModelConfig:
    """Validate a ``[model]`` table into a :class:`ModelConfig`; errors name ``where``.

    Args:
        data: the table's keys and values.
        where: the file it came from, for messages.
    """
    try:
        return build_config({"model": dict(data)}).model
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def save_checkpoint(path: str | Path, cfg: ModelConfig,
                    tensors: Mapping[str, np.ndarray]) -> None:
    """Write an hvdllm checkpoint directory atomically.

    Args:
        path: the directory to create (must not exist, or be empty).
        cfg: the model section the tensors belong to.
        tensors: hvdllm-named full tensors; GPT's tied ``lm_head.weight``
            may be included (it is dropped) or left out.
    """
    tensors = drop_tied_head(cfg, tensors)
    check_tensors({k: v.shape for k, v in tensors.items()}, parameter_shapes(cfg),
                  "the tensors to save")
    with atomic_directory(path) as tmp:
        write_safetensors(tmp / TENSORS_FILE, tensors)
        write_text_synced(tmp / CONFIG_FILE, model_config_toml(cfg))


def load_checkpoint(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read an hvdllm checkpoint directory: its model config and hvdllm-named tensors.

    A training checkpoint (``output.dir/checkpoints/step-N``, or a run's
    ``output.dir`` or ``checkpoints`` directory for its newest usable one)
    is consolidated here: its shards are assembled into full tensors.

    Args:
        path: the checkpoint directory.
    """
    from .train_checkpoint import consolidated_parameters, is_training_checkpoint

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} not found")
    if not (path / CONFIG_FILE).is_file() and is_training_checkpoint(path):
        model, tensors = consolidated_parameters(path)
        cfg = parse_model_config({k: v for k, v in model.items() if k != "init_from"},
                                 str(path))
        check_tensors({k: v.shape for k, v in tensors.items()}, parameter_shapes(cfg),
                      str(path))
        return cfg, tensors
    toml_path = path / CONFIG_FILE
    if not toml_path.is_file():
        raise CheckpointError(f"{path} is not an hvdllm checkpoint: {CONFIG_FILE} is missing "
                              f"(a Hugging Face directory is given as hf:{path})")
    try:
        data = tomllib.loads(toml_path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CheckpointError(f"cannot read {toml_path}: {exc}") from None
    if not isinstance(data.get("model"), dict) or set(data) != {"model"}:
        raise CheckpointError(f"{toml_path} must hold exactly one [model] table")
    cfg = parse_model_config(data["model"], str(toml_path))
    tensors = read_safetensors(path / TENSORS_FILE)
    check_tensors({k: v.shape for k, v in tensors.items()}, parameter_shapes(cfg),
                  str(path / TENSORS_FILE))
    return cfg, tensors
