"""The layout planner: its memory model against real models, its enumeration
against the config checks, its errors, and the ``hvdllm plan`` command."""
from __future__ import annotations

import json
import math

import pytest

from hvdllm.cli import main
from hvdllm.common import planner as P
from hvdllm.common.config import build_config, load_config
from hvdllm.common.errors import ConfigError

from conftest import REPO, base_env, hvdllm_cmd, run_ok

A100 = P.PRESETS["a100-80g"]


def _cfg(**model):
    base = dict(family="gpt", n_layer=4, n_head=4, d_model=64, seq_len=32, vocab_size=256)
    base.update(model)
    return build_config({"model": base, "train": {"global_batch_size": 8, "micro_batch_size": 2}})


@pytest.mark.parametrize("family,kv", [("gpt", 0), ("llama", 0), ("llama", 2)])
def test_activation_model_matches_saved_tensors(family, kv):
    """The per-layer activation floats equal what autograd really keeps (torch)."""
    torch = pytest.importorskip("torch")
    from hvdllm.torch.engine import build_model
    from hvdllm.torch.pipeline.memory import SavedTensorMeter

    per_layer = []
    for layers in (1, 3):
        cfg = _cfg(family=family, n_layer=layers, n_head=4, n_kv_head=kv, d_model=128, seq_len=64)
        model = build_model(cfg)
        idx = torch.randint(0, 256, (2, 64))
        meter = SavedTensorMeter(model.parameters())
        with meter.watch():
            model(idx)
        per_layer.append(meter.peak_bytes)
    measured = (per_layer[1] - per_layer[0]) / 2 / 4 / (2 * 64)
    predicted = P.activation_floats("torch", cfg.model, tp=1, sp=False)
    assert measured == pytest.approx(predicted, rel=0.02), (measured, predicted)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_parameter_count_matches_the_model(family):
    torch = pytest.importorskip("torch")
    from hvdllm.torch.engine import build_model

    cfg = _cfg(family=family)
    model = build_model(cfg)
    real = sum(p.numel() for p in model.parameters())
    assert P.stage_parameters(cfg.model, tp=1, pp=1) == [real]
    # Pipeline stages hold every layer once; GPT's tied table is duplicated on the last stage.
    stages = P.stage_parameters(cfg.model, tp=1, pp=2)
    extra = cfg.model.vocab_size * cfg.model.d_model if family == "gpt" else 0
    assert sum(stages) == real + extra
    # Tensor parallelism shards the matrices: two shards hold less than the whole but
    # more than half (norms and row-parallel biases are replicated).
    half = P.stage_parameters(cfg.model, tp=2, pp=1)[0]
    assert real / 2 < half < real


@pytest.mark.parametrize("schedule,p,m,v", [
    ("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("1f1b", 4, 2, 1), ("1f1b", 3, 7, 1),
    ("interleaved", 2, 4, 2), ("interleaved", 4, 8, 2), ("interleaved", 3, 6, 3),
    ("interleaved", 4, 4, 2)])
def test_peak_in_flight_matches_the_simulator(schedule, p, m, v):
    from hvdllm.common.pipeline_sim import simulate_schedule

    sim = simulate_schedule(schedule, p, m, v)
    assert P.peak_in_flight(schedule, p, m, v) == tuple(st.peak_activations for st in sim.stages)


def test_memory_model_orders_the_options():
    cfg = _cfg(n_layer=8, d_model=256, n_head=8, seq_len=256)
    base = P.Layout(dp=2, tp=1, pp=1, micro_batch_size=2)
    mem = lambda **kw: P.predict_memory(cfg, P.replace(base, **kw), A100)  # noqa: E731
    # ZeRO-1 halves the moments at dp=2 but adds its flat gradient and master shard
    params = mem().params / 4
    assert mem(zero=1).optimizer == pytest.approx(8 * params / 2 + 4 * params + 4 * params / 2)
    wide = P.replace(base, dp=8)
    assert P.predict_memory(cfg, P.replace(wide, zero=1), A100).optimizer < \
        P.predict_memory(cfg, wide, A100).optimizer
    assert mem(recompute="full").activations < mem().activations / 3
    assert mem(micro_batch_size=4).activations == pytest.approx(2 * mem().activations)
    tp = P.Layout(dp=1, tp=2, pp=1, micro_batch_size=2)
    assert P.predict_memory(cfg, P.replace(tp, sequence_parallel=True), A100).activations < \
        P.predict_memory(cfg, tp, A100).activations
    gpipe = P.Layout(dp=1, tp=1, pp=2, micro_batch_size=1, schedule="gpipe")
    f1b = P.replace(gpipe, schedule="1f1b")
    assert P.predict_memory(cfg, gpipe, A100).activations > \
        P.predict_memory(cfg, f1b, A100).activations


def test_time_model_orders_the_options():
    cfg = _cfg(n_layer=8, d_model=256, n_head=8, seq_len=256)
    lay = P.Layout(dp=1, tp=1, pp=2, micro_batch_size=1)
    t = lambda **kw: P.predict_time(cfg, P.replace(lay, **kw), A100)  # noqa: E731
    assert t(recompute="full").compute > t().compute
    assert t().bubble > 0 and t(micro_batch_size=4).bubble > t().bubble
    assert t(schedule="interleaved", virtual_stages=2).bubble < t().bubble
    assert P.predict_time(cfg, P.Layout(1, 1, 1, 2), A100).bubble == 0


def test_every_enumerated_layout_passes_the_config_checks():
    cfg = _cfg(n_layer=4, n_head=4, d_model=64)
    layouts = P.enumerate_layouts(cfg, 4)
    seen = {(l.dp, l.tp, l.pp) for l in layouts}
    assert seen == {(4, 1, 1), (2, 2, 1), (2, 1, 2), (1, 4, 1), (1, 2, 2), (1, 1, 4)}
    for lay in layouts:
        cfg2 = load_config(None, [f"model.n_layer=4", "model.d_model=64", "model.seq_len=32",
                                  "train.global_batch_size=8"] + lay.overrides())
        assert (cfg2.parallel.dp, cfg2.parallel.tp, cfg2.parallel.pp) == (lay.dp, lay.tp, lay.pp)
    assert any(l.schedule == "interleaved" for l in layouts)
    assert all(l.zero == 0 for l in layouts if l.dp == 1)


def test_no_valid_layout_names_the_reason():
    cfg = _cfg(n_head=6, d_model=96, n_layer=4)
    cfg = P.replace(cfg, train=P.replace(cfg.train, global_batch_size=6, micro_batch_size=1))
    with pytest.raises(ConfigError) as err:
        P.plan(cfg, 5, A100)
    text = str(err.value)
    assert "\n" not in text
    assert "n_head=6 allows tp in {1, 2, 3, 6}" in text
    assert "n_layer=4 < pp" in text and "not divisible by dp=5" in text


def test_memory_limit_names_the_smallest_layout():
    cfg = _cfg(n_layer=8, d_model=256, n_head=8, seq_len=256)
    best = min(P.predict_memory(cfg, lay, A100).total for lay in P.enumerate_layouts(cfg, 4))
    with pytest.raises(ConfigError, match=r"no layout fits in .* the smallest predicted peak") as err:
        P.plan(cfg, 4, A100, memory=best * 0.99)
    assert f"{best / P.GB:.3g} GB" in str(err.value)
    # at exactly that limit one layout fits, and it is the one named
    result = P.plan(cfg, 4, A100, memory=best)
    assert len(result.fitting) >= 1 and result.best.memory.total <= best


def test_large_models_need_model_parallelism():
    """LLaMA 70B cannot run data-parallel only on 80 GB ranks; the plan shards it."""
    cfg = build_config({"model": dict(family="llama", n_layer=80, n_head=64, n_kv_head=8,
                                      d_model=8192, d_ff=28672, seq_len=4096, vocab_size=32000),
                        "train": dict(global_batch_size=512, micro_batch_size=1,
                                      precision="bf16")})
    result = P.plan(cfg, 64, A100)
    best = result.best.layout
    assert best.tp * best.pp >= 8
    assert result.best.memory.total <= 80 * P.GB
    assert not any(p.fits for p in result.candidates if p.layout.tp * p.layout.pp == 1)


def test_spearman():
    assert P.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert P.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert P.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)


def test_hardware_rate_interpolates():
    hw = P.replace(A100, matmul=((1e6, 1e9), (1e8, 1e11)))
    assert hw.rate(1e7) == pytest.approx(1e10)
    assert hw.rate(1e9) == 1e11
    assert hw.rate(1e5) < 1e9


def test_cli_plan_prints_pasteable_settings(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", str(REPO / "configs" / "demo.toml"), "--world", "4",
                 "--hardware", "a100-80g", "--top", "3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    sets = [line.split("--set ", 1)[1] for line in text.splitlines() if "--set " in line]
    cfg = load_config(REPO / "configs" / "demo.toml", sets)
    assert cfg.parallel.dp * cfg.parallel.tp * cfg.parallel.pp == 4
    data = json.loads(out.read_text())
    assert data["world"] == 4 and len(data["candidates"]) > 3
    times = [c["time"]["total"] for c in data["candidates"] if c["fits"]]
    assert times == sorted(times)


@pytest.mark.parametrize("argv,needle", [
    (["--world", "0"], "--world must be >= 1"),
    (["--world", "2", "--memory-per-rank", "-1"], "--memory-per-rank must be > 0"),
    (["--world", "2", "--hardware", "tpu"], "unknown --hardware 'tpu'"),
    (["--world", "2", "--calibration", "/nonexistent/c.json"], "calibration file not found"),
])
def test_cli_plan_bad_input_is_one_line(argv, needle, capsys):
    assert main(["plan", "--config", str(REPO / "configs" / "demo.toml")] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hvdllm: error: ") and needle in err and "\n" not in err


def test_calibrate_measures_and_plans(tmp_path):
    """``--calibrate`` starts two ranks, times compute and links, trains the trial
    model under its four layouts, and the plan reads it."""
    cal = tmp_path / "cal.json"
    proc = run_ok(hvdllm_cmd("plan", "--calibrate", "--calibration", str(cal),
                             "--ranks-per-node", "2"), timeout=600)
    assert proc.stdout.startswith(f"wrote {cal}")
    assert proc.stdout.count("trial ") == 4 and "trials fit compute" in proc.stdout
    hw = P.load_hardware(cal)
    assert hw.ranks_per_node == 2 and not hw.shared_compute  # measured while sharing
    assert all(r > 1e8 for _, r in hw.matmul)
    assert hw.intra_bw > 1e7 and 0 < hw.intra_latency < 1e-2 and hw.p2p_bw > 1e7
    assert hw.overhead > 50e6  # torch is loaded
    # the engine's own paths: a polled wait and a chunk drive
    assert 0 <= hw.wait_overhead < 0.05
    assert 0 < hw.action_overhead < 0.05
    # fitted by the trials (a real step is slower than the formulas' sum on a CPU)
    assert 0.5 < hw.compute_factor < 10 and 0.5 <= hw.pipeline_factor < 5
    assert 0 <= hw.collective_overhead < 0.05 and 0 <= hw.sp_collective_overhead < 0.05
    result = P.plan(load_config(REPO / "configs" / "demo.toml"), 2, hw)
    assert result.best.time.total > 0 and math.isfinite(result.best.tokens_per_sec)


def test_memory_probe_sees_a_peak(tmp_path, monkeypatch):
    """The probe the planner's benchmark measures with: a freed 64 MiB block
    still shows in the peak, not in the start."""
    import numpy as np

    from hvdllm.common import memory_probe

    monkeypatch.setenv(memory_probe.ENV, str(tmp_path))
    probe = memory_probe.start("numpy")
    block = np.ones(16 * 2**20, dtype=np.float32)  # 64 MiB, touched
    del block
    report = probe.finish(0, tmp_path)
    assert json.loads((tmp_path / "memory-rank-0.json").read_text()) == report
    if report["hwm_reset"]:
        assert 60 * 2**20 < report["rss_peak_delta"] < 200 * 2**20


def test_mem_rate_curve_and_older_calibration_files(tmp_path):
    """Element-wise bandwidth follows the tensor size between calibrated points;
    a calibration file without the curve (older) still loads and uses mem_bw."""
    hw = P.replace(A100, mem_bw=1e10, mem_curve=((2.0**18, 4e10), (2.0**25, 1e10)))
    assert hw.mem_rate(1.0) == 4e10 and hw.mem_rate(2.0**30) == 1e10
    assert 1e10 < hw.mem_rate(2.0**21) < 4e10
    assert hw.mem_rate(2.0**20) > hw.mem_rate(2.0**22)
    path = tmp_path / "hw.json"
    P.save_hardware(hw, path)
    assert P.load_hardware(path) == hw
    data = json.loads(path.read_text())
    del data["mem_curve"]
    path.write_text(json.dumps(data))
    old = P.load_hardware(path)
    assert old.mem_curve == () and old.mem_rate(2.0**18) == 1e10


def test_tensorflow_accumulation_holds_one_micro_batch(tmp_path):
    """TensorFlow's gradient accumulation runs its micro-batches one after another:
    four micro-batches of 2 sequences peak far below one micro-batch of 8
    (the loop once ran them side by side and held them all)."""
    pytest.importorskip("tensorflow")
    peaks = {}
    for mbs in (2, 8):
        report = tmp_path / f"mem-{mbs}"
        env = dict(base_env(), TF_CPU_ALLOCATOR_USE_BFC="true", HVDLLM_MEMORY_REPORT=str(report))
        run_ok(hvdllm_cmd("train", "--set", "train.framework=tensorflow",
                          "--set", "model.n_layer=2", "--set", "model.d_model=256",
                          "--set", "model.n_head=8", "--set", "model.seq_len=256",
                          "--set", "train.global_batch_size=8",
                          "--set", f"train.micro_batch_size={mbs}", "--set", "train.steps=2",
                          "--set", "output.checkpoint=false",
                          "--set", f"output.dir={tmp_path / f'run-{mbs}'}"),
               timeout=240, env=env)
        peaks[mbs] = json.loads((report / "memory-rank-0.json").read_text())["allocator_peak_delta"]
    # activations are ~23 MiB a sequence here, the static state ~27 MiB
    assert peaks[2] < 0.5 * peaks[8], peaks


def test_engine_overheads_price_collectives_and_pipeline_actions():
    """A calibrated cost per tensor-parallel collective grows with the collectives
    a layout makes (sequence parallelism makes twice as many); one per pipeline
    action grows with the micro-batches and virtual stages."""
    cfg = _cfg(n_layer=4)
    base = P.replace(A100, collective_overhead=0.0, action_overhead=0.0, wait_overhead=0.0)
    costly = P.replace(base, collective_overhead=1e-3, action_overhead=2e-3)

    def lay(**kw):
        d = dict(dp=1, tp=1, pp=1, micro_batch_size=2, schedule="1f1b", virtual_stages=1,
                 zero=0, recompute="none", sequence_parallel=False)
        d.update(kw)
        return P.Layout(**d)

    n_micro = 4  # global batch 8, micro-batch 2
    for sp, calls in ((False, 4 * 4 + 2), (True, 4 * 8 + 2)):
        extra = (P.predict_time(cfg, lay(tp=2, sequence_parallel=sp), costly).tp_comm
                 - P.predict_time(cfg, lay(tp=2, sequence_parallel=sp), base).tp_comm)
        assert extra == pytest.approx(n_micro * calls * 1e-3)
    for v, schedule in ((1, "1f1b"), (2, "interleaved")):
        extra = (P.predict_time(cfg, lay(pp=2, virtual_stages=v, schedule=schedule), costly).pp_comm
                 - P.predict_time(cfg, lay(pp=2, virtual_stages=v, schedule=schedule), base).pp_comm)
        assert extra == pytest.approx(n_micro * v * 2e-3)
    assert P.predict_time(cfg, lay(dp=2), costly).total == P.predict_time(cfg, lay(dp=2), base).total


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_trial_fit_recovers_the_engine_figures(framework):
    """Step times made by a machine with known engine figures are fitted back to
    them: the compute factor from the data-parallel trial, the per-collective
    costs from the tensor-parallel ones, the pipeline factor from the pipeline one."""
    from hvdllm.common import plan_trials as T

    truth = P.replace(A100, compute_factor=1.8, pipeline_factor=1.25,
                      collective_overhead=3e-4, sp_collective_overhead=1.5e-4)
    measured = {}
    for name, sets in T.TRIALS.items():
        cfg = T._trial_config(framework, sets)
        measured[name] = P.predict_time(cfg, T._trial_layout(cfg), truth).total
    guess = P.replace(truth, compute_factor=1.0, pipeline_factor=1.0, collective_overhead=0.0,
                      sp_collective_overhead=None)
    fitted = T.fit(framework, guess, measured)
    assert fitted == pytest.approx({"compute_factor": 1.8, "pipeline_factor": 1.25,
                                    "collective_overhead": 3e-4,
                                    "sp_collective_overhead": 1.5e-4}, rel=1e-6)
    # the factors act where they should: compute everywhere, the pipeline factor in pipelines
    cfg = _cfg(n_layer=4)
    dp = P.Layout(2, 1, 1, 2, "1f1b", 1, 0, "none", False)
    pp = P.Layout(1, 1, 2, 2, "1f1b", 1, 0, "none", False)
    assert (P.predict_time(cfg, dp, truth).compute
            == pytest.approx(1.8 * P.predict_time(cfg, dp, A100).compute))
    assert (P.predict_time(cfg, pp, truth).compute
            == pytest.approx(1.8 * 1.25 * P.predict_time(cfg, pp, A100).compute))
