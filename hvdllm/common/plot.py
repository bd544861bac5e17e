"""``hvdllm plot``: training curves of one or more runs in one image.

Reads each run directory's ``metrics.jsonl`` and, for the tokens axis,
``config.toml`` (tokens per step = ``train.global_batch_size`` x
``model.seq_len``).  Draws with matplotlib's Agg canvas: no display needed.
"""
from __future__ import annotations

import json
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EnvironmentSetupError, HvdllmError


class PlotError(HvdllmError):
    """A run directory, its metrics or the output path cannot be used."""


@dataclass
class RunCurves:
    """The curves of one run, read from its directory."""

    name: str
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    tokens_per_sec_steps: list[int] = field(default_factory=list)
    tokens_per_sec: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    tokens_per_step: int | None = None  # None: no usable config.toml

    def tokens(self, steps: list[int]) -> list[int]:
        assert self.tokens_per_step is not None
        return [s * self.tokens_per_step for s in steps]


def _number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _tokens_per_step(run: Path) -> int | None:
    path = run / "config.toml"
    if not path.is_file():
        return None
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        batch, seq_len = doc["train"]["global_batch_size"], doc["model"]["seq_len"]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        print(f"hvdllm: warning: {path}: no tokens per step ({type(exc).__name__}: {exc}); "
              f"plotting {run.name} against steps only", file=sys.stderr)
        return None
    if not (isinstance(batch, int) and isinstance(seq_len, int)):
        return None
    return batch * seq_len


def load_run(run_dir: str | Path) -> RunCurves:
    """Read one run directory; :class:`PlotError` if it has no metrics to plot."""
    run = Path(run_dir)
    if not run.is_dir():
        raise PlotError(f"{run_dir}: no such run directory")
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir}: no metrics.jsonl in this directory (is it a run's "
                        f"output.dir?)")
    curves = RunCurves(name=run.resolve().name or str(run_dir))
    records = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        records += 1
        loss = _number(record.get("loss"))
        if loss is not None:
            curves.steps.append(step)
            curves.loss.append(loss)
        tok_s = _number(record.get("tokens_per_sec"))
        if tok_s is not None:
            curves.tokens_per_sec_steps.append(step)
            curves.tokens_per_sec.append(tok_s)
        val = _number(record.get("val_loss"))
        if val is not None:
            curves.val_steps.append(step)
            curves.val_loss.append(val)
    if not records:
        raise PlotError(f"{path}: no metrics records (the file is empty); nothing to plot")
    curves.tokens_per_step = _tokens_per_step(run)
    return curves


def _label_runs(runs: list[RunCurves], dirs: list[str]) -> None:
    """Label runs by directory name, or by the path given where names repeat."""
    names = [r.name for r in runs]
    for run, given in zip(runs, dirs):
        if names.count(run.name) > 1:
            run.name = str(given)


def make_figure(runs: list[RunCurves], title: str | None = None):
    """One figure: loss (and dashed val loss) vs step, loss vs tokens, tokens/s vs step."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError as exc:
        raise EnvironmentSetupError(f"hvdllm plot needs the matplotlib package, which cannot "
                                    f"be imported ({exc}); run `make setup`") from None
    with_tokens = any(r.tokens_per_step for r in runs)
    ncols = 3 if with_tokens else 2
    fig = Figure(figsize=(5.0 * ncols, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    ax_step, ax_speed = axes[0], axes[-1]
    ax_tokens = axes[1] if with_tokens else None
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        ax_step.plot(run.steps, run.loss, color=color, label=run.name)
        if run.val_steps:
            ax_step.plot(run.val_steps, run.val_loss, color=color, linestyle="--",
                         label=f"{run.name} (val)")
        if ax_tokens is not None and run.tokens_per_step:
            ax_tokens.plot(run.tokens(run.steps), run.loss, color=color, label=run.name)
            if run.val_steps:
                ax_tokens.plot(run.tokens(run.val_steps), run.val_loss, color=color,
                               linestyle="--", label=f"{run.name} (val)")
        ax_speed.plot(run.tokens_per_sec_steps, run.tokens_per_sec, color=color, label=run.name)
    ax_step.set(title="loss", xlabel="step", ylabel="loss")
    if ax_tokens is not None:
        ax_tokens.set(title="loss vs tokens", xlabel="tokens", ylabel="loss")
        ax_tokens.xaxis.set_major_formatter(EngFormatter())
    ax_speed.set(title="throughput", xlabel="step", ylabel="tokens/s")
    ax_speed.yaxis.set_major_formatter(EngFormatter())
    for ax in axes:
        ax.grid(alpha=0.3)
    ax_step.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def plot_runs(run_dirs: list[str], out: str | Path, title: str | None = None) -> list[RunCurves]:
    """Write the figure of ``run_dirs`` to ``out`` (format from its extension)."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise PlotError(f"--out {out}: directory {parent} does not exist")
    if out.is_dir():
        raise PlotError(f"--out {out} is a directory; give a file name such as curves.png")
    runs = [load_run(d) for d in run_dirs]
    _label_runs(runs, run_dirs)
    fig = make_figure(runs, title)
    fmt = out.suffix.lstrip(".").lower()
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise PlotError(f"--out {out}: unknown image type {out.suffix or '(none)'}; use one of "
                        f"{', '.join('.' + k for k in sorted(supported))}")
    try:
        fig.savefig(out, dpi=110)
    except OSError as exc:
        raise PlotError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    return runs
