"""Tier 1: config loading, overrides and validation."""
import re
import tomllib

import pytest

from hvdllm.common.config import Config, build_config, load_config, to_toml
from hvdllm.common.errors import ConfigError, NotImplementedYetError


def test_defaults_match_cli_contract():
    cfg = build_config({})
    assert (cfg.model.family, cfg.model.n_layer, cfg.model.n_head, cfg.model.d_model) == ("gpt", 2, 4, 64)
    assert (cfg.model.seq_len, cfg.model.vocab_size) == (64, 256)
    assert (cfg.train.framework, cfg.train.steps, cfg.train.global_batch_size) == ("torch", 20, 8)
    assert (cfg.train.micro_batch_size, cfg.train.lr, cfg.train.seed) == (2, 1e-3, 1234)
    assert cfg.data.path == "" and cfg.output.dir == "runs/example"


def test_toml_file_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[model]\nn_layer = 3\n[train]\nframework = "torch"\nlr = 1\n[parallel]\ndp = 2\n')
    cfg = load_config(f, ["train.framework=tensorflow", "train.lr=3e-4", "data.path=/some/where",
                          "output.dir=out dir"])
    assert cfg.model.n_layer == 3
    assert cfg.train.framework == "tensorflow"
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.path == "/some/where"
    assert cfg.output.dir == "out dir"
    assert cfg.parallel.dp == 2
    assert cfg.grad_accum_steps == 8 // (2 * 2)


def test_int_promoted_to_float_but_not_bool_to_int():
    assert isinstance(build_config({"train": {"lr": 1}}).train.lr, float)
    with pytest.raises(ConfigError, match="model.n_layer' expects int, got bool"):
        build_config({"model": {"n_layer": True}})


def test_roundtrip_through_toml():
    cfg = build_config({}, ["model.n_layer=5", "data.path=x\"y", "train.framework=tensorflow"])
    again = build_config(tomllib.loads(to_toml(cfg)))
    assert again == cfg


@pytest.mark.parametrize("overrides, pattern", [
    (["model.n_layers=2"], r"unknown config key 'model.n_layers'; did you mean 'model.n_layer'\?"),
    (["model.lr=1"], r"unknown config key 'model.lr'; did you mean 'train.lr'\?"),
    (["modle.n_layer=1"], r"unknown config section \[modle\]; did you mean \[model\]"),
    (["model.n_layer=abc"], r"'model.n_layer' expects int, got str 'abc'"),
    (["train.lr=fast"], r"'train.lr' expects float, got str 'fast'"),
    (["train.global_batch_size=7"],
     r"global_batch_size=7 is not divisible by train.micro_batch_size=2 x parallel.dp=1"),
    (["train.framework=jax"], r"unknown train.framework 'jax'"),
    (["train.framework=torhc"], r"did you mean 'torch'"),
    (["model.d_model=65"], r"d_model=65 is not divisible by model.n_head=4"),
    (["model.vocab_size=100"], r"model.vocab_size = 100 is smaller than data.tokenizer.s vocabulary of 256"),
    (["train.steps=0"], r"'train.steps' must be > 0"),
    (["oops"], r"--set expects section.key=value"),
])
def test_bad_values_name_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config({}, overrides)


def test_config_checks_consult_the_adapter_declaration(monkeypatch):
    """A feature the chosen adapter does not declare fails at config time, in one line."""
    from hvdllm.common import capabilities
    from hvdllm.tensorflow import capabilities as tf_caps

    reduced = capabilities.Capabilities("tensorflow", tf_caps.CAPABILITIES.features
                                        - {"pipeline", "compression:topk"})
    monkeypatch.setattr(tf_caps, "CAPABILITIES", reduced)
    with pytest.raises(NotImplementedYetError) as info:
        build_config({}, ["train.framework=tensorflow", "model.n_layer=4", "parallel.pp=2",
                          "train.compression=topk"])
    msg = str(info.value)
    assert "\n" not in msg
    assert "parallel.pp=2" in msg and "train.compression='topk'" in msg
    assert "use train.framework='torch'" in msg
    build_config({}, ["train.framework=torch", "model.n_layer=4", "parallel.pp=2",
                      "train.compression=topk"])


def test_every_config_choice_is_a_declared_feature_of_some_adapter():
    """needed_features only names features an adapter can declare (no typos on either side)."""
    from hvdllm.common import capabilities, config as config_mod

    declared = set().union(*(capabilities.adapter_capabilities(fw).features
                             for fw in config_mod.FRAMEWORKS))
    cases = ([f"model.family={f}" for f in config_mod.MODEL_FAMILIES]
             + [f"parallel.schedule={s}" for s in config_mod.PIPELINE_SCHEDULES]
             + [f"parallel.partition={s}" for s in config_mod.PARTITIONS]
             + [f"parallel.recompute={s}" for s in config_mod.RECOMPUTE]
             + [f"train.optimizer={s}" for s in config_mod.OPTIMIZERS])
    for case in cases:
        cfg = build_config({}, [case, "model.n_layer=4", "parallel.pp=2", "parallel.tp=2",
                                "parallel.sequence_parallel=true", "train.grad_clip=1",
                                "train.precision=bf16"])
        for feature, _ in capabilities.needed_features(cfg):
            assert feature in declared, (case, feature)


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nmicro_batch = 2\n")
    with pytest.raises(ConfigError, match="did you mean 'train.micro_batch_size'"):
        load_config(f)


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_config_dataclass_is_independent_per_instance():
    a, b = Config(), Config()
    a.model.n_layer = 9
    assert b.model.n_layer == 2


@pytest.mark.parametrize("overrides, pattern", [
    (["parallel.tp=3", "model.n_head=4", "model.d_model=96"],
     r"model.n_head=4 is not divisible by parallel.tp=3"),
    (["parallel.tp=2", "model.family=llama", "model.n_head=4", "model.n_kv_head=1"],
     r"model.n_kv_head=1 is not divisible by parallel.tp=2"),
    (["parallel.tp=4", "model.d_ff=90", "model.n_head=4"],
     r"model.d_ff=90 is not divisible by parallel.tp=4"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "model.seq_len=63"],
     r"seq_len divisible by parallel.tp, got seq_len=63 and tp=2"),
    (["parallel.sequence_parallel=true"], r"needs parallel.tp > 1"),
    (["model.family=llama", "model.n_head=4", "model.n_kv_head=3"],
     r"model.n_kv_head=3 does not divide model.n_head=4"),
    (["model.n_kv_head=2"], r"grouped-query attention is a llama feature"),
    (["model.family=lama"], r"did you mean 'llama'"),
])
def test_tensor_parallel_shapes_checked_at_config_time(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config({}, overrides)


def test_family_defaults_for_mlp_width_and_kv_heads():
    gpt = build_config({}, ["model.d_model=96"]).model
    assert (gpt.ff_width, gpt.kv_heads) == (384, 4)
    llama = build_config({}, ["model.family=llama", "model.d_model=96",
                              "model.n_kv_head=2"]).model
    assert llama.ff_width == 256  # 8/3 * 96 = 256 exactly
    assert llama.kv_heads == 2
    assert build_config({}, ["model.family=llama", "model.d_model=104",
                             "model.n_head=4"]).model.ff_width == 320  # 277.3 -> 320
    ok = build_config({}, ["parallel.tp=2", "parallel.dp=1", "model.family=llama",
                           "model.n_kv_head=2", "parallel.sequence_parallel=true"])
    assert ok.parallel.tp == 2 and ok.parallel.sequence_parallel


@pytest.mark.parametrize("overrides, pattern", [
    (["parallel.pp=3", "model.n_layer=2"], r"parallel.pp=3 is greater than model.n_layer=2"),
    (["parallel.pp=2", "model.n_layer=8", "parallel.schedule=interleaved",
      "parallel.virtual_stages=3"], r"virtual_stages=3 must divide the layers per stage"),
    (["parallel.virtual_stages=2", "model.n_layer=4"], r"needs parallel.schedule = 'interleaved'"),
    (["parallel.pp=2", "model.n_layer=4", "parallel.schedule=interleaved",
      "parallel.virtual_stages=2", "train.global_batch_size=6", "train.micro_batch_size=2"],
     r"3 micro-batches, pp=2"),
    (["parallel.schedule=1f1c"], r"unknown parallel.schedule '1f1c' \(did you mean '1f1b'\?\)"),
    (["parallel.partition=even"], r"unknown parallel.partition 'even'"),
    (["parallel.recompute=some"], r"unknown parallel.recompute 'some'"),
])
def test_pipeline_layout_checked_at_config_time(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config({}, overrides)


@pytest.mark.parametrize("overrides, pattern", [
    (["train.compression=gzip"], r"train.compression = 'gzip' is not one of"),
    (["train.compression=topk", "train.topk_ratio=0"], r"topk_ratio"),
    (["train.compression=topk", "train.topk_ratio=1.5"], r"topk_ratio"),
    (["train.compression=powersgd", "train.powersgd_rank=0"], r"powersgd_rank"),
    (["train.zero=1", "train.optimizer=sgd"], r"ZeRO-1 .* not 'sgd'"),
    (["train.zero=2"], r"train.zero must be 0 \(off\) or 1"),
    (["train.precision=fp8"], r"train.precision = 'fp8' is not one of"),
    (["train.grad_clip=-1"], r"train.grad_clip must be >= 0"),
    (["train.optimizer=adam_w"], r"unknown train.optimizer 'adam_w' \(did you mean 'adamw'\?\)"),
    (["train.profile_steps=[3, 2]"], r"train.profile_steps must be \[first, last\]"),
    (["train.profile_steps=[1]"], r"train.profile_steps must be \[first, last\]"),
    (["train.profile_steps=2"], r"'train.profile_steps' expects a list of int, got int 2"),
    (["train.profile_steps=[21, 22]"], r"starts after the last step \(train.steps = 20\)"),
])
def test_data_parallel_depth_settings_checked_at_config_time(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config({}, overrides)


def test_tensorflow_declares_everything_torch_does():
    """TensorFlow is a peer: no setting is left that only torch runs."""
    from hvdllm.common.capabilities import adapter_capabilities

    assert adapter_capabilities("torch").features <= adapter_capabilities("tensorflow").features
    build_config({}, ["train.framework=tensorflow", "model.n_layer=4", "parallel.pp=2",
                      "parallel.tp=2", "parallel.sequence_parallel=true", "train.zero=1",
                      "train.precision=fp16", "train.grad_clip=1", "parallel.recompute=full"])


def test_tensorflow_takes_the_whole_model_section():
    build_config({}, ["train.framework=tensorflow", "model.family=llama", "model.n_kv_head=2",
                      "model.d_ff=100", "model.norm_eps=1e-6", "model.init_from=hf:somewhere"])


def test_list_settings_round_trip_through_toml():
    cfg = build_config({}, ["train.profile_steps=[2, 5]"])
    assert cfg.train.profile_steps == [2, 5]
    assert build_config(tomllib.loads(to_toml(cfg))) == cfg


@pytest.mark.parametrize("overrides,pattern", [
    (["parallel.mode=async"], "unknown parallel.mode 'async'"),
    (["parallel.mode=ps", "parallel.staleness=-1"], "parallel.staleness must be >= 0, got -1"),
    (["parallel.mode=ps", "parallel.ps_servers=0"], "parallel.ps_servers must be >= 1"),
    (["parallel.mode=ps", "parallel.ps_compensation=extrapolat"],
     "unknown parallel.ps_compensation 'extrapolat' (did you mean 'extrapolate'?)"),
    (["parallel.straggler=1"], 'parallel.straggler must be "REPLICA:FACTOR" or "*:FACTOR"'),
    (["parallel.straggler=0:0.5"], "the factor >= 1"),
    (["parallel.dp=2", "parallel.straggler=2:2"], "names replica 2, but there are dp=2"),
    (["parallel.mode=ps", "train.zero=1", "parallel.dp=2"], 'needs train.zero = 0'),
    (["parallel.mode=ps", "train.grad_clip=1.0"], "needs train.grad_clip = 0"),
    (["parallel.mode=ps", "train.resume=/some/dir"], 'train.resume must be "auto" or "never"'),
])
def test_parameter_server_settings_checked_at_config_time(overrides, pattern):
    with pytest.raises(ConfigError, match=re.escape(pattern)):
        build_config({}, overrides)


def test_transient_straggler_slows_one_replica_per_step_the_same_on_every_rank():
    from hvdllm.common.config import parse_straggler, slow_factor

    knob = parse_straggler("*:2")
    picks = [[slow_factor(knob, r, 3, 1234, step) for r in range(3)] for step in range(1, 61)]
    assert all(sorted(p) == [1.0, 1.0, 2.0] for p in picks)
    counts = [sum(p[r] == 2.0 for p in picks) for r in range(3)]
    assert min(counts) >= 10, counts  # every replica gets its turn
    assert slow_factor(parse_straggler("1:3"), 1, 3, 0, 5) == 3.0
    assert slow_factor(parse_straggler("1:3"), 0, 3, 0, 5) == 1.0
    assert slow_factor(None, 0, 3, 0, 5) == 1.0
