"""Run outputs: TensorBoard events, the progress bar and ``hvdllm plot``.

Fast, no MPI: the writer and the bar are used directly, the plot command
runs as ``python -m hvdllm plot`` on synthetic runs.
"""
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hvdllm import cli
from hvdllm.common.errors import EnvironmentSetupError
from hvdllm.common.metrics import MetricsWriter, ProgressBar
from hvdllm.common.plot import load_run, make_figure

REPO = Path(__file__).resolve().parents[1]


def train_record(step, loss, **extra):
    record = {"step": step, "loss": loss, "lr": 1e-3 * step, "tokens_per_sec": 1000.0 + step,
              "elapsed_sec": 0.1 * step, "epoch": 0, "comm_bytes": 4096 * step,
              "grad_norm": 0.5, "loss_scale": 1024.0, "skipped": False, "mfu": 0.25,
              "tokens_per_sec_per_rank": 500.0 + step}
    record.update(extra)
    return record


def scalars(run_dir):
    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_tags_steps_values(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    writer.open()
    writer.write_config("[train]\nsteps = 30\n")
    for step in (10, 20, 30):
        writer.log(train_record(step, 5.0 - step / 10))
    writer.log({"step": 20, "val_loss": 4.25})
    writer.close()
    got = scalars(tmp_path)
    assert set(got) == {"train/loss", "val/loss", "train/lr", "perf/tokens_per_sec", "perf/mfu",
                        "train/grad_norm", "train/loss_scale", "comm/bytes"}
    assert got["train/loss"] == [(10, 4.0), (20, 3.0), (30, 2.0)]
    assert got["val/loss"] == [(20, 4.25)]
    assert got["comm/bytes"] == [(10, 40960.0), (20, 81920.0), (30, 122880.0)]
    assert [s for s, _ in got["perf/tokens_per_sec"]] == [10, 20, 30]
    assert got["train/lr"][1] == (20, pytest.approx(0.02))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20, 30, 20]


def test_each_log_is_on_disk_before_close(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    writer.open()
    writer.log(train_record(10, 3.5))
    try:  # read while the writer is still open, as after a crash
        assert scalars(tmp_path)["train/loss"] == [(10, 3.5)]
    finally:
        writer.close()


def test_resume_hides_the_interrupted_runs_later_steps(tmp_path):
    first = MetricsWriter(tmp_path, enabled=True)
    first.open()
    for step in (10, 20, 30, 40, 50):
        first.log(train_record(step, float(step)))
        first.log({"step": step, "val_loss": float(step) + 0.5})
    first.close()  # the checkpoint was at step 30; steps 40 and 50 are lost work
    second = MetricsWriter(tmp_path, enabled=True)
    second.open(keep_until=30)
    second.log(train_record(40, -40.0))  # no validation yet in the resumed run
    second.close()
    got = scalars(tmp_path)
    assert got["train/loss"] == [(10, 10.0), (20, 20.0), (30, 30.0), (40, -40.0)]
    # val/loss had nothing new: only the purge at step 31 can hide 40 and 50
    assert [s for s, _ in got["val/loss"]] == [10, 20, 30]
    assert [s for s, _ in got["comm/bytes"]] == [10, 20, 30, 40]
    steps = [json.loads(line)["step"]
             for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 10, 20, 20, 30, 30, 40]


def test_fresh_start_drops_an_earlier_runs_events(tmp_path):
    old = MetricsWriter(tmp_path, enabled=True)
    old.open()
    old.log({"step": 10, "val_loss": 9.0})
    old.close()
    new = MetricsWriter(tmp_path, enabled=True)
    new.open()
    new.log(train_record(10, 1.0))
    new.close()
    assert "val/loss" not in scalars(tmp_path)
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "out", enabled=False)
    writer.open()
    writer.log(train_record(10, 1.0))
    writer.close()
    assert not (tmp_path / "out").exists()


def test_missing_tensorboard_is_a_one_line_error(tmp_path, monkeypatch):
    # the import now raises ImportError
    monkeypatch.setitem(sys.modules, "tensorboard.summary.writer.record_writer", None)
    with pytest.raises(EnvironmentSetupError) as info:
        MetricsWriter(tmp_path, enabled=True)
    message = str(info.value)
    assert "tensorboard package" in message and "make setup" in message and "\n" not in message
    MetricsWriter(tmp_path, enabled=False)  # other ranks do not need it


LINE = re.compile(r"^\[(#*)(\.*)\] (\d+)/20 \| loss (\d+\.\d{4}) \| tok_s (\d+) \| \d+s<\d+s$")


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def plain_env(monkeypatch):
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "HOROVOD_RANK"):
        monkeypatch.delenv(var, raising=False)


def test_progress_plain_line_format(plain_env):
    stream = io.StringIO()  # not a terminal
    bar = ProgressBar(20, enabled=True, stream=stream)
    bar.update(3, loss=4.93834, tok_s=12602)
    bar.update(20, loss=2.5, tok_s=13000)
    lines = stream.getvalue().split("\n")
    assert lines[-1] == "" and "\r" not in stream.getvalue()
    first, last = LINE.match(lines[0]), LINE.match(lines[1])
    assert first and last, lines
    assert first.groups()[:5] == ("####", "." * 20, "3", "4.9383", "12602")
    assert last.groups()[:4] == ("#" * 24, "", "20", "2.5000")


@pytest.mark.parametrize("var", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "HOROVOD_RANK"])
def test_progress_under_a_launcher_prints_one_line_per_update(plain_env, monkeypatch, var):
    monkeypatch.setenv(var, "2")
    stream = FakeTerminal()  # even on a terminal: launchers prefix each line
    bar = ProgressBar(20, enabled=True, stream=stream)
    assert not bar.live
    for step in (5, 10, 15):
        bar.update(step, loss=1.0, tok_s=100)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [LINE.match(line).group(3) for line in lines] == ["5", "10", "15"]


def test_progress_live_bar_on_a_terminal(plain_env):
    stream = FakeTerminal()
    bar = ProgressBar(20, enabled=True, stream=stream, done=4)
    assert bar.live
    bar.update(10, loss=3.14159, tok_s=12000)
    bar.update(20, loss=2.0, tok_s=12000)
    out = stream.getvalue()
    assert "\r" in out and "10/20" in out and "20/20" in out
    assert "loss 3.1416" in out and "tok_s 12000" in out
    assert out.endswith("\n")  # closed at the last step
    quiet = FakeTerminal()
    ProgressBar(20, enabled=False, stream=quiet).update(5, loss=1.0)
    assert quiet.getvalue() == ""


def make_run(path, losses, tokens_per_step=None, val_every=0):
    path.mkdir(parents=True)
    lines = []
    for i, loss in enumerate(losses, 1):
        lines.append(json.dumps({"step": 10 * i, "loss": loss, "lr": 1e-3,
                                 "tokens_per_sec": 1000.0 * i, "elapsed_sec": i}))
        if val_every and i % val_every == 0:
            lines.append(json.dumps({"step": 10 * i, "val_loss": loss + 0.1}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if tokens_per_step:
        (path / "config.toml").write_text(
            f"[model]\nseq_len = 8\n\n[train]\nglobal_batch_size = {tokens_per_step // 8}\n")
    return path


def test_load_run_and_figure(tmp_path):
    a = make_run(tmp_path / "a", [4.0, 3.0, 2.5, 2.0], tokens_per_step=64, val_every=2)
    b = make_run(tmp_path / "b", [4.5, 3.5, 3.0])  # no config.toml: steps only
    run_a, run_b = load_run(a), load_run(b)
    assert run_a.steps == [10, 20, 30, 40] and run_a.val_steps == [20, 40]
    assert run_a.val_loss == pytest.approx([3.1, 2.1])
    assert run_a.tokens(run_a.steps) == [640, 1280, 1920, 2560]
    assert run_b.tokens_per_step is None and run_b.val_steps == []
    fig = make_figure([run_a, run_b], title="T")
    loss_ax, tokens_ax, speed_ax = fig.axes
    styles = [(line.get_label(), line.get_linestyle(), line.get_color())
              for line in loss_ax.get_lines()]
    assert styles == [("a", "-", "C0"), ("a (val)", "--", "C0"), ("b", "-", "C1")]
    assert [line.get_label() for line in tokens_ax.get_lines()] == ["a", "a (val)"]
    assert list(tokens_ax.get_lines()[0].get_xdata()) == [640, 1280, 1920, 2560]
    assert len(speed_ax.get_lines()) == 2
    assert len(make_figure([run_b]).axes) == 2  # no tokens anywhere: no tokens panel


def plot(*args):
    return subprocess.run([sys.executable, "-m", "hvdllm", "plot", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_plot_command_writes_a_png(tmp_path):
    a = make_run(tmp_path / "run_a", [4.0, 3.0, 2.5, 2.0], tokens_per_step=64, val_every=2)
    b = make_run(tmp_path / "run_b", [4.5, 3.5, 3.0, 2.8], tokens_per_step=128)
    out = tmp_path / "curves.png"
    res = plot(a, b, "--out", out, "--title", "two runs")
    assert res.returncode == 0, res.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(out)
    assert image.shape[0] > 300 and image.shape[1] > 900  # three panels side by side


def test_plot_bad_inputs_are_one_line_errors(tmp_path, capsys):
    good = make_run(tmp_path / "good", [3.0, 2.0])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    cases = [
        ([str(tmp_path), "--out", str(tmp_path / "x.png")], "no metrics.jsonl"),
        ([str(empty), "--out", str(tmp_path / "x.png")], "no metrics records"),
        ([str(good), "--out", str(tmp_path / "missing" / "x.png")], "does not exist"),
    ]
    for args, fragment in cases:
        assert cli.main(["plot", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("hvdllm: error: ") and fragment in err, err
    assert not (tmp_path / "x.png").exists()
    res = plot(empty, "--out", tmp_path / "x.png")  # and as a command
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("hvdllm: error: ") and res.stderr.count("\n") == 1, res.stderr
