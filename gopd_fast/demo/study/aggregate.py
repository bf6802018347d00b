"""Aggregate the finished cells into ``docs/study/summary.json`` (the plot data), the PNGs and the markdown tables.

Paired differences: every method is evaluated on the same held-out tasks with the same sampling seed as the method
it is compared to, so a difference is paired by (seed, task). Two 95% CIs are reported for each comparison:
``pairs``, a Student-t interval over all (seed, task) pairs (tasks and seeds pooled: the variation between tasks),
and ``seeds``, a Student-t interval over the per-seed mean differences (n = number of seeds: the variation between
training runs, wide with 3 seeds).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gopd_fast.demo.run import format_table, summarize
from gopd_fast.envs.evaluate import t_interval

TEACHER = "teacher"
# (a, b): the comparisons reported as a - b.
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("guided-opd", "opd"), ("opd", "zero-shot"), ("guided-opd", "zero-shot"), ("sft", "zero-shot"),
    ("constant-0.5", "zero-shot"), ("constant-0.5", "opd"), ("gopd-reverse-both", "guided-opd"),
    ("gopd-swapped", "guided-opd"), (TEACHER, "zero-shot"),
)


def load_cells(cells_dir: str | Path) -> dict[str, Any]:
    """{"results": {size: {method: {seed: records}}}, "teacher": {seed: records}, "train": {size: {method: {seed:
    info}}}, "diagnostics": {size: {label: failure_mode}}, "bases": {size: info}} from the cell files."""
    out: dict[str, Any] = {"results": {}, "teacher": {}, "train": {}, "diagnostics": {}, "bases": {}}
    for path in sorted(Path(cells_dir).glob("*.json")):
        data = json.loads(path.read_text())
        if path.name.startswith("diagnostic__"):
            out["diagnostics"].setdefault(data["size"], {})[data["label"]] = data["failure_mode"]
            continue
        cell = data["cell"]
        size, method, seed = cell["size"], cell["method"], int(cell["seed"])
        if method == TEACHER:
            out["teacher"][seed] = data["eval"]
            continue
        out["results"].setdefault(size, {}).setdefault(method, {})[seed] = data["eval"]
        if "train" in data:
            out["train"].setdefault(size, {}).setdefault(method, {})[seed] = data["train"]
        if "base" in data:
            out["bases"][size] = data["base"]
    return out


def paired_difference(a: Mapping[int, Sequence[dict]], b: Mapping[int, Sequence[dict]],
                      key: str = "score") -> dict[str, Any] | None:
    """Mean of a - b over the (seed, task) pairs both have, with the two 95% CIs (see the module doc)."""
    diffs: list[float] = []
    per_seed: list[float] = []
    for seed in sorted(set(a) & set(b)):
        bt = {r["task_id"]: float(r[key]) for r in b[seed]}
        d = [float(r[key]) - bt[r["task_id"]] for r in a[seed] if r["task_id"] in bt]
        if d:
            diffs += d
            per_seed.append(sum(d) / len(d))
    if len(diffs) < 2:
        return None
    pairs = t_interval(diffs)
    out: dict[str, Any] = {"mean": pairs.mean, "pairs": {"low": pairs.low, "high": pairs.high, "n": len(diffs)},
                           "per_seed": per_seed}
    if len(per_seed) >= 2:
        seeds = t_interval(per_seed)
        out["seeds"] = {"low": seeds.low, "high": seeds.high, "n": len(per_seed)}
    return out


def _curves(results: Mapping[str, Any], train: Mapping[str, Any], k: int) -> dict[str, Any]:
    """method -> {"steps": [0, ...], "seed<s>": [...]}; step 0 is the base's Score on the curve's first k tasks."""
    curves: dict[str, Any] = {}
    for method, by_seed in train.items():
        seeds = sorted(by_seed)
        steps = [0] + [s for s, _ in by_seed[seeds[0]]["curve"]]
        curves[method] = {"steps": steps}
        for seed in seeds:
            zs = results.get("zero-shot", {}).get(seed, [])[:k]
            start = sum(r["score"] for r in zs) / len(zs) if zs else math.nan
            points = [v for _, v in by_seed[seed]["curve"]]
            if len(points) == len(steps) - 1:
                curves[method][f"seed{seed}"] = [start, *points]
    return curves


def _by_limit(records_by_seed: Mapping[int, Sequence[dict]]) -> dict[int, float]:
    recs = [r for rs in records_by_seed.values() for r in rs]
    limits = sorted({int(L) for r in recs for L in r["score_at_limit"]})
    return {L: sum(float(r["score_at_limit"][str(L)] if str(L) in r["score_at_limit"] else r["score_at_limit"][L])
                   for r in recs) / len(recs) for L in limits}


def aggregate(cells_dir: str | Path, out_dir: str | Path, curve_tasks: int = 16,
              beta_schedules: Mapping[str, Sequence[float]] | None = None, draw: bool = True) -> dict[str, Any]:
    """Write ``out_dir``/summary.json, tables.md and (``draw``) img/*.png; returns the summary."""
    from gopd_fast.demo import plots

    cells = load_cells(cells_dir)
    out_dir = Path(out_dir)
    summary: dict[str, Any] = {"sizes": {}, "teacher": None, "bases": cells["bases"],
                               "beta_schedules": dict(beta_schedules or {}),
                               "paired_ci_note": __doc__.split("Paired differences: ")[1].strip()}
    if cells["teacher"]:
        summary["teacher"] = summarize(cells["teacher"])
    md: list[str] = []
    for size, results in cells["results"].items():
        rows: dict[str, Any] = {}
        if cells["teacher"]:
            rows[TEACHER] = summary["teacher"]
        rows.update({m: summarize(by_seed) for m, by_seed in results.items()})
        with_teacher = {**results, TEACHER: cells["teacher"]}
        diffs = {}
        for a, b in COMPARISONS:
            if a in with_teacher and b in with_teacher:
                d = paired_difference(with_teacher[a], with_teacher[b])
                if d is not None:
                    diffs[f"{a} - {b}"] = d
        train = cells["train"].get(size, {})
        by_limit = {m: _by_limit(r) for m, r in with_teacher.items() if r}
        summary["sizes"][size] = {
            "table": rows, "paired_differences": diffs, "learning_curves": _curves(results, train, curve_tasks),
            "score_vs_turn_limit": by_limit, "failure_mode": cells["diagnostics"].get(size, {}),
            "train_seconds_per_step": {m: [i.get("seconds_per_step") for i in by_seed.values()]
                                       for m, by_seed in train.items()},
        }
        md += [f"### Student size `{size}`", "", format_table(rows), "", format_differences(diffs), ""]
        if summary["sizes"][size]["failure_mode"]:
            md += [format_failure_modes(summary["sizes"][size]["failure_mode"]), ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out_dir / "tables.md").write_text("\n".join(md) + "\n")
    if draw:
        img = out_dir / "img"
        img.mkdir(exist_ok=True)
        if summary["beta_schedules"]:
            plots.plot_beta_schedules(summary["beta_schedules"], img / "beta_schedule.png")
        reference = {TEACHER: summary["teacher"]["score"]["mean"]} if summary["teacher"] else {}
        for size, s in summary["sizes"].items():
            if s["learning_curves"]:
                plots.plot_learning_curves(s["learning_curves"], img / f"learning_curves-{size}.png",
                                           reference=reference)
            plots.plot_score_vs_turn_limit(s["score_vs_turn_limit"], img / f"score_vs_turn_limit-{size}.png")
            for label, fm in s["failure_mode"].items():
                plots.plot_failure_mode(fm, img / f"failure_mode-{size}-{label}.png")
    return summary


def _at(rows: Sequence[Mapping[str, Any]], field: str, value: int, key: str) -> float | None:
    """``row[key]`` of the row whose ``field`` is ``value`` (None when there is none)."""
    return next((float(r[key]) for r in rows if int(r[field]) == value), None)


def format_failure_modes(by_label: Mapping[str, Any], turn: int = 5) -> str:
    """One row per diagnosed student (``gopd_fast.diagnostics.failure_mode``): how far from the expert path its own
    rollouts drift vs the teacher's, and how reliable the teacher is on and far off that path."""
    f = lambda x, fmt: "-" if x is None else format(x, fmt)
    intro = (f"Failure-mode diagnostic: off-path fraction of the states after {turn} turns in student-only / "
             "teacher-only rollouts; the teacher's probability of the oracle's action and KL(student || teacher) on "
             "the expert path (distance 0) and far off it (the last, open-ended distance bucket).")
    header = (f"| student | off path after turn {turn} (student-only / teacher-only) | teacher p(oracle action): on "
              "path / far off | KL(student, teacher): on path / far off | far-off states |")
    lines = [intro, "", header, "|---|---|---|---|---|"]
    for label, fm in by_label.items():
        dist = fm["by_distance"]
        d_far = max(int(r["distance"]) for r in dist)   # the open-ended last bucket (>= d_far)
        off = [_at(fm["by_turn"][who], "turn", turn, "off_path_fraction") for who in ("student", "teacher")]
        states = sum(int(r["states"]) for r in dist)
        n_far = int(_at(dist, "distance", d_far, "states"))
        lines.append(
            f"| {label} | {f(off[0], '.2f')} / {f(off[1], '.2f')} | "
            f"{f(_at(dist, 'distance', 0, 'teacher_oracle_agreement'), '.2f')} / "
            f"{f(_at(dist, 'distance', d_far, 'teacher_oracle_agreement'), '.2f')} (>= {d_far}) | "
            f"{f(_at(dist, 'distance', 0, 'kl_student_teacher'), '.3f')} / "
            f"{f(_at(dist, 'distance', d_far, 'kl_student_teacher'), '.3f')} | {n_far} of {states} |")
    return "\n".join(lines)


def format_differences(diffs: Mapping[str, Any]) -> str:
    lines = ["| comparison (Score) | mean difference | 95% CI over (seed, task) pairs | 95% CI over seeds |",
             "|---|---|---|---|"]
    for name, d in diffs.items():
        p = d["pairs"]
        s = d.get("seeds")
        seeds = f"[{s['low']:+.2f}, {s['high']:+.2f}] (n={s['n']})" if s else "-"
        lines.append(f"| {name} | {d['mean']:+.2f} | [{p['low']:+.2f}, {p['high']:+.2f}] (n={p['n']}) | {seeds} |")
    return "\n".join(lines)
