"""The demo's figures are written as PNG files from plain data (gopd_fast.demo.plots)."""
from __future__ import annotations

import json

import pytest

from gopd_fast.demo import plots

PNG = b"\x89PNG\r\n\x1a\n"


def test_each_figure_writes_a_png(tmp_path):
    outs = [
        plots.plot_beta_schedules({"guided-opd": [1.0, 0.5, 0.0], "opd": [0.0] * 3}, tmp_path / "b.png"),
        plots.plot_learning_curves({"opd": {"steps": [0, 2], "seed0": [1.0, 5.0], "seed1": [2.0, 4.0]}},
                                   tmp_path / "c.png", reference={"teacher": 80.0}),
        plots.plot_score_vs_turn_limit({"opd": {1: 0.0, 2: 10.0}}, tmp_path / "t.png"),
    ]
    for p in outs:
        assert p.read_bytes()[:8] == PNG


def test_live_curves_take_ragged_seeds_and_redraw_in_place(tmp_path):
    """Seeds still training have fewer points; a method without points yet is skipped; each call rewrites the file."""
    out = tmp_path / "curves.png"
    points = {"opd": {"seed0": [(0, 10.0, 5.0, 15.0), (5, 20.0, 12.0, 28.0)], "seed1": [(0, 12.0, 6.0, 18.0)]},
              "guided-opd": {"seed0": []}}
    assert plots.plot_live_curves(points, out, reference={"teacher": 60.0}) == out
    first = out.read_bytes()
    points["guided-opd"]["seed0"].append((5, 30.0, 25.0, 35.0))
    plots.plot_live_curves(points, out)
    assert out.read_bytes()[:8] == PNG and out.read_bytes() != first
    with pytest.raises(ValueError, match="png"):
        plots.plot_live_curves(points, tmp_path / "curves.jpg")


def test_redraw_from_run_folder(tmp_path):
    row = {"turn": 0, "states": 2, "teacher_maxprob": 0.9, "teacher_entropy": 0.3, "kl_student_teacher": 0.1,
           "teacher_p_oracle_action": 0.8, "off_path_fraction": 0.0}
    dist = [{"distance": d, "open_ended": d == 1, "states": 1, "teacher_maxprob": 0.5,
             "teacher_entropy": 1.0, "kl_student_teacher": 0.2, "teacher_oracle_agreement": 0.4} for d in (0, 1)]
    data = {"beta_schedules": {"opd": [0.0, 0.0]},
            "learning_curves": {"opd": {"steps": [0, 1], "seed0": [0.0, 1.0]}},
            "reference": {"teacher": 50.0}, "score_vs_turn_limit": {"opd": {"1": 0.0, "2": 3.0}},
            "failure_mode": {"by_turn": {"student": [row], "teacher": [row]}, "by_distance": dist}}
    (tmp_path / "plot_data.json").write_text(json.dumps(data))
    outs = plots.redraw(tmp_path)
    assert {p.name for p in outs} == {"beta_schedule.png", "learning_curves.png", "score_vs_turn_limit.png",
                                      "failure_mode.png"}


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=".png"):
        plots.plot_beta_schedules({"opd": [0.0]}, tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="same length"):
        plots.plot_learning_curves({"opd": {"steps": [0, 1], "seed0": [1.0], "seed1": [1.0, 2.0]}},
                                   tmp_path / "c.png")
