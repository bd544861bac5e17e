"""Tier 3: the ``hvdllm`` command: bad input, outputs and launch methods."""
import sys
import tomllib

import pytest

from conftest import (base_env, horovodrun_prefix, hvdllm_cmd, mpirun_prefix, read_metrics, run,
                      run_ok)

TINY = ["--set", "train.steps=3", "--set", "model.n_layer=1", "--set", "model.d_model=32",
        "--set", "model.seq_len=16"]


def assert_one_line_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    errors = [line for line in res.stderr.splitlines() if line.startswith("hvdllm: error")]
    assert len(errors) == 1, res.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


@pytest.mark.parametrize("overrides, fragments", [
    (["model.n_layers=2"], ["unknown config key 'model.n_layers'", "did you mean 'model.n_layer'"]),
    (["model.n_head=four"], ["'model.n_head' expects int"]),
    (["parallel.dp=2"], ["dp=2 x tp=1 x pp=1 = 2", "world size 1"]),
    (["train.global_batch_size=10", "train.micro_batch_size=4"],
     ["global_batch_size=10 is not divisible", "micro_batch_size=4", "parallel.dp=1"]),
    (["data.path=/definitely/not/here.txt"], ["data.path not found: /definitely/not/here.txt"]),
    (["train.framework=jax"], ["unknown train.framework 'jax'", "torch", "tensorflow"]),
    (["parallel.tp=2", "model.n_head=3", "model.d_model=96"],
     ["model.n_head=3 is not divisible by parallel.tp=2"]),
    (["parallel.tp=2", "parallel.dp=2"], ["dp=2 x tp=2 x pp=1 = 4", "world size 1"]),
    (["parallel.tp=2", "model.family=llama", "model.n_kv_head=1", "model.n_head=4"],
     ["model.n_kv_head=1 is not divisible by parallel.tp=2"]),
    (["parallel.tp=4", "model.d_ff=90", "model.n_head=4"],
     ["model.d_ff=90 is not divisible by parallel.tp=4"]),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "model.seq_len=63"],
     ["seq_len divisible by parallel.tp", "seq_len=63"]),
])
def test_bad_input_is_one_clear_line(overrides, fragments, tmp_path):
    args = ["train", "--set", f"output.dir={tmp_path}"]
    for item in overrides:
        args += ["--set", item]
    assert_one_line_error(run(hvdllm_cmd(*args), timeout=120), *fragments)


def test_corpus_shorter_than_seq_len(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("tiny text")
    res = run(hvdllm_cmd("train", "--set", f"data.path={short}", "--set", "model.seq_len=64"),
              timeout=120)
    assert_one_line_error(res, "corpus has 9 tokens", "seq_len + 1 = 65")


@pytest.mark.parametrize("framework, module", [("torch", "torch"), ("tensorflow", "tensorflow")])
def test_horovod_not_built_says_how_to_build(framework, module, tmp_path):
    # A Horovod install whose framework extension is missing, as after a
    # `pip install horovod` that skipped the build.
    fake = tmp_path / "fake" / "horovod"
    (fake / module).mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.28.1'\n")
    (fake / module / "__init__.py").write_text(
        f"raise ImportError('Extension horovod.{module} has not been built')\n")
    res = run(hvdllm_cmd("train", "--set", f"train.framework={framework}", *TINY),
              timeout=120, env=base_env(extra_pythonpath=str(tmp_path / "fake")))
    assert_one_line_error(res, "Horovod with", "not available", f"horovod.{module} has not been built",
                          "make setup", "scripts/build_horovod.sh")


def test_dp_mismatch_under_mpirun_is_one_line(tmp_path):
    res = run(mpirun_prefix(2) + hvdllm_cmd("train", "--set", "parallel.dp=4",
                                            "--set", f"output.dir={tmp_path}"), timeout=120)
    assert res.returncode != 0
    assert "Traceback" not in res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if "hvdllm: error" in line]
    assert len(errors) == 1 and "world size 2" in errors[0], res.stderr


def test_single_process_run_writes_outputs(tmp_path):
    out = tmp_path / "run"
    res = run_ok(hvdllm_cmd("train", *TINY, "--set", f"output.dir={out}", "--set",
                            "train.sample_tokens=20"), timeout=120)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert {"step", "loss", "tokens_per_sec", "elapsed_sec"} <= set(r)
        assert r["tokens_per_sec"] > 0 and r["loss"] > 0
    resolved = tomllib.loads((out / "config.toml").read_text())
    assert resolved["model"]["n_layer"] == 1 and resolved["output"]["dir"] == str(out)
    assert "hvdllm: sample:" in res.stdout
    assert "3/3" in res.stdout  # the progress bar reached the end


@pytest.mark.multirank
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_horovodrun_launch(framework, tmp_path):
    out = tmp_path / "run"
    res = run_ok(horovodrun_prefix(2) + hvdllm_cmd(
        "train", *TINY, "--set", "parallel.dp=2", "--set", f"train.framework={framework}",
        "--set", f"output.dir={out}"), timeout=300)
    assert "world 2 = dp 2" in res.stdout
    assert len(read_metrics(out)) == 3


def test_config_file_from_repo_loads():
    from pathlib import Path

    from hvdllm.common.config import load_config
    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.toml")):
        load_config(path)
