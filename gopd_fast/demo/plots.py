"""The demo's figures, drawn from plain numbers (no models, no envs), as PNG files with matplotlib's Agg backend.

Every function takes already-aggregated data, writes one PNG and returns its path, so the figures can be redrawn
from a run folder's JSON without re-running anything (``python -m gopd_fast.demo.plots RUN_DIR``).
"""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display, never opens a window
import matplotlib.pyplot as plt

# One colour per method, fixed so every figure reads the same way.
METHOD_COLORS = {
    "teacher": "#444444",
    "zero-shot": "#9e9e9e",
    "sft": "#1f77b4",
    "opd": "#d62728",
    "guided-opd": "#2ca02c",
    "constant-0.5": "#ff7f0e",
}
_HELD_OUT_SCORE = "held-out Score (student only, T=0.4)"   # the learning curves' y axis


def _color(method: str) -> str:
    return METHOD_COLORS.get(method, "#8c564b")


def _check_out(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"out path must end with .png, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _mean_and_band(rows: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[float]]:
    """Mean and mean +- one standard error over the seeds (rows), per x position (columns)."""
    n = len(rows)
    if n == 0:
        raise ValueError("need at least one series")
    width = len(rows[0])
    if any(len(r) != width for r in rows):
        raise ValueError("all series of one method must have the same length")
    means, lo, hi = [], [], []
    for j in range(width):
        col = [float(r[j]) for r in rows]
        m = sum(col) / n
        se = math.sqrt(sum((c - m) ** 2 for c in col) / (n - 1) / n) if n > 1 else 0.0
        means.append(m)
        lo.append(m - se)
        hi.append(m + se)
    return means, lo, hi


def _reference_lines(ax, reference: Mapping[str, float] | None) -> None:
    """One dashed horizontal line per named reference Score (teacher, zero-shot, ...)."""
    for name, value in (reference or {}).items():
        ax.axhline(value, ls="--", lw=1.2, color=_color(name), label=name)


def _score_axes(ax, *, xlabel: str, ylabel: str, title: str, legend_fontsize: int = 8) -> None:
    """Labels, the Score range 0..100 with a margin, grid and legend: the frame of every Score figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylim(-2, 102)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_fontsize, loc="best")


def _save(fig, out: Path, *, dpi: int) -> Path:
    """Lay out, write and close the figure (closed: the demo draws many and pyplot keeps open ones alive)."""
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def plot_beta_schedules(schedules: Mapping[str, Sequence[float]], out: str | Path) -> Path:
    """``schedules``: method -> beta at each training step (0, 1, ..., steps-1)."""
    out = _check_out(out)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for method, betas in schedules.items():
        ax.plot(range(len(betas)), betas, label=method, color=_color(method), lw=2)
    ax.set_xlabel("training step")
    ax.set_ylabel("beta = P(teacher generates a turn)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Guidance schedules")
    ax.grid(alpha=0.3)
    ax.legend(loc="center right")
    return _save(fig, out, dpi=120)


def plot_learning_curves(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    out: str | Path,
    *,
    reference: Mapping[str, float] | None = None,
) -> Path:
    """``curves``: method -> {"steps": [...], "seed<k>": [score at each step], ...}; the band is +-1 s.e. over seeds.

    ``reference``: horizontal lines (e.g. {"teacher": 71.0, "zero-shot": 12.0}).
    """
    out = _check_out(out)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for method, data in curves.items():
        steps = list(data["steps"])
        series = [list(v) for k, v in data.items() if k != "steps"]
        if not steps or not series:
            continue
        mean, lo, hi = _mean_and_band(series)
        ax.plot(steps, mean, marker="o", ms=3, lw=2, color=_color(method), label=f"{method} (n={len(series)})")
        ax.fill_between(steps, lo, hi, color=_color(method), alpha=0.15)
    _reference_lines(ax, reference)
    _score_axes(ax, xlabel="training step", ylabel=_HELD_OUT_SCORE,
                title="Learning curves (mean +- 1 s.e. over seeds)")
    return _save(fig, out, dpi=120)


def plot_live_curves(
    points: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    out: str | Path,
    *,
    reference: Mapping[str, float] | None = None,
) -> Path:
    """The learning curves while the demo trains: one line per (method, seed), each point with its own 95% CI.

    ``points``: method -> {"seed<k>": [(step, score, low, high), ...]}. Seeds may have different lengths (a run
    still in progress); methods without points yet are skipped. ``reference``: horizontal lines.
    """
    out = _check_out(out)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    styles = ("-", "--", ":", "-.")
    for method, by_seed in points.items():
        for i, (seed, rows) in enumerate(sorted(by_seed.items())):
            if not rows:
                continue
            steps = [float(r[0]) for r in rows]
            score = [float(r[1]) for r in rows]
            err = [[max(0.0, s - float(r[2])) for s, r in zip(score, rows)],
                   [max(0.0, float(r[3]) - s) for s, r in zip(score, rows)]]
            ax.errorbar(steps, score, yerr=err, marker="o", ms=3, lw=1.8, capsize=2, ls=styles[i % len(styles)],
                        color=_color(method), label=f"{method} {seed}")
    _reference_lines(ax, reference)
    ax.xaxis.get_major_locator().set_params(integer=True)   # steps are whole numbers
    _score_axes(ax, xlabel="training step", ylabel=_HELD_OUT_SCORE,
                title="Learning curves so far (95% CI per point)", legend_fontsize=7)
    return _save(fig, out, dpi=110)


def plot_score_vs_turn_limit(
    by_method: Mapping[str, Mapping[int, float]], out: str | Path
) -> Path:
    """``by_method``: method -> {turn limit: mean Score}."""
    out = _check_out(out)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for method, points in by_method.items():
        limits = sorted(int(k) for k in points)
        ax.plot(limits, [points[k] if k in points else points[str(k)] for k in limits],  # type: ignore[index]
                lw=2, color=_color(method), label=method,
                ls="--" if method in ("teacher", "zero-shot") else "-")
    _score_axes(ax, xlabel="turn limit", ylabel="mean held-out Score", title="Score vs turn limit")
    return _save(fig, out, dpi=120)


def plot_failure_mode(diag: Mapping[str, object], out: str | Path) -> Path:
    """The failure-mode diagnostic (see ``gopd_fast.demo.diagnostics``), three panels:

    1. teacher confidence (mean max-prob on its own greedy choice over the action tokens) by turn index,
       on states reached by student-only vs teacher-only rollouts;
    2. student-teacher reverse KL by turn index, same two sources;
    3. teacher confidence and the teacher's probability of the oracle's action, by the number of extra steps the
       episode has cost so far (0 = on the expert path).
    """
    out = _check_out(out)
    by_turn = diag["by_turn"]  # type: ignore[index]
    by_dist = diag["by_distance"]  # type: ignore[index]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"student": ("#d62728", "states from student rollouts"),
              "teacher": ("#2ca02c", "states from teacher rollouts")}
    for source, (color, label) in styles.items():
        rows = by_turn.get(source, [])  # type: ignore[union-attr]
        if not rows:
            continue
        turns = [r["turn"] for r in rows]
        axes[0].plot(turns, [r["teacher_maxprob"] for r in rows], marker="o", ms=3, color=color, label=label)
        axes[1].plot(turns, [r["kl_student_teacher"] for r in rows], marker="o", ms=3, color=color, label=label)
        off = [r["off_path_fraction"] for r in rows]
        if any(math.isfinite(x) for x in off):   # unknown without an oracle from arbitrary states: no line
            axes[0].plot(turns, off, ls=":", color=color, alpha=0.8,
                         label=f"{source}: fraction of states off the expert path")
    axes[0].set_title("Teacher confidence by turn")
    axes[0].set_xlabel("turn index")
    axes[0].set_ylabel("teacher max-prob on action tokens  /  off-path fraction")
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].set_title("Student-teacher KL(p_s || p_t) by turn")
    axes[1].set_xlabel("turn index")
    axes[1].set_ylabel("mean per-token reverse KL (nats)")
    dists = [r["distance"] for r in by_dist]  # type: ignore[union-attr]
    labels = [str(d) if not r.get("open_ended") else f">={d}" for d, r in zip(dists, by_dist)]  # type: ignore
    xs = list(range(len(dists)))
    axes[2].bar([x - 0.2 for x in xs], [r["teacher_maxprob"] for r in by_dist], width=0.4,  # type: ignore
                color="#2ca02c", label="teacher max-prob")
    axes[2].bar([x + 0.2 for x in xs], [r["teacher_oracle_agreement"] for r in by_dist], width=0.4,  # type: ignore
                color="#9467bd", label="teacher P(oracle's action)")
    for x, r in zip(xs, by_dist):  # type: ignore[arg-type]
        axes[2].text(x, 1.02, f"n={r['states']}", ha="center", fontsize=7)
    axes[2].set_xticks(xs, labels)
    axes[2].set_ylim(0, 1.25)
    axes[2].set_xlabel("off-path distance: extra steps spent vs the oracle's shortest path")
    axes[2].set_title("Teacher reliability off the expert path")
    for ax in axes[:2]:
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right" if ax is axes[2] else "best")
    return _save(fig, out, dpi=110)


def redraw(run_dir: str | Path) -> list[Path]:
    """Redraw every figure from ``RUN_DIR/plot_data.json`` (written by the demo)."""
    run_dir = Path(run_dir)
    data = json.loads((run_dir / "plot_data.json").read_text())
    outs = [
        plot_beta_schedules(data["beta_schedules"], run_dir / "beta_schedule.png"),
        plot_learning_curves(data["learning_curves"], run_dir / "learning_curves.png",
                             reference=data.get("reference")),
        plot_score_vs_turn_limit(data["score_vs_turn_limit"], run_dir / "score_vs_turn_limit.png"),
    ]
    if data.get("failure_mode"):
        outs.append(plot_failure_mode(data["failure_mode"], run_dir / "failure_mode.png"))
    return outs


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m gopd_fast.demo.plots RUN_DIR")
    for p in redraw(sys.argv[1]):
        print(p)
