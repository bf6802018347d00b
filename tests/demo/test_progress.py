"""The demo's live progress (gopd_fast.demo.progress): the metrics tail, the bars and the curve lines."""
from __future__ import annotations

import contextlib
import io
import json
import time

import pytest

from gopd_fast.demo import progress


def test_tail_delivers_each_record_once_in_order_and_waits_for_whole_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    got: list[dict] = []
    with progress.MetricsTail(path, got.append, poll_s=0.01):
        time.sleep(0.05)                        # no file yet: nothing, no error
        with open(path, "a") as f:
            f.write(json.dumps({"kind": "train", "step": 1}) + "\n")
            f.write('{"kind": "eval", ')       # half a line: must not be parsed yet
            f.flush()
            time.sleep(0.1)
            assert got == [{"kind": "train", "step": 1}]
            f.write('"step": 1}\n' + json.dumps({"kind": "train", "step": 2}) + "\n")
    # stop() read the rest before returning
    assert got == [{"kind": "train", "step": 1}, {"kind": "eval", "step": 1}, {"kind": "train", "step": 2}]


def test_tail_reraises_a_callback_error_in_the_caller(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train"}\n')

    def boom(record: dict) -> None:
        raise KeyError("step")

    with pytest.raises(RuntimeError, match="metrics.jsonl"), progress.MetricsTail(path, boom, poll_s=0.01):
        time.sleep(0.05)


def test_bars_on_stderr_curve_lines_on_stdout(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    status = lambda: "distill 4/100 s, run 9/1200 s"
    with (contextlib.redirect_stdout(out), contextlib.redirect_stderr(err),
          progress.Bar(3, "distill 1/2 opd seed 0", "steps", status) as bar):
        curves = progress.LiveCurves(tmp_path / "curves.png", total_steps=3, reference={"teacher": 50.0})
        bar.advance()
        curves.add_record("opd", 0, {"kind": "eval", "step": 1, "eval/episodes": 16, "eval/score": 12.5,
                                     "eval/score_low": 3.25, "eval/score_high": 21.75})
        curves.add_record("opd", 0, {"kind": "eval", "step": 2, "eval/episodes": 0})
        bar.advance(2)
    assert out.getvalue().splitlines() == [
        "[demo] curve opd seed 0 step 1/3: Score 12.5 [3.2, 21.8] (16 episodes)",
        "[demo] curve opd seed 0 step 2: no episodes"]
    assert "distill 1/2 opd seed 0: 3/3 steps" in err.getvalue() and "run 9/1200 s" in err.getvalue()
    assert curves.points == {"opd": {"seed0": [(1, 12.5, 3.25, 21.75)]}}
    assert (tmp_path / "curves.png").is_file()
    with pytest.raises(ValueError, match="total"):
        progress.Bar(-1, "x", "steps", str)
