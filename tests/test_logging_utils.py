"""metrics.jsonl after a restart: records past the resumed step and lines cut by a kill are dropped, once."""
from __future__ import annotations

import json

from gopd_fast.logging_utils import MetricsLogger, truncate_metrics


def _write(path, records, tail=b""):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail)


def _steps(path):
    return [(r["kind"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]


RUN = [{"kind": "train", "step": 1}, {"kind": "train", "step": 2}, {"kind": "eval", "step": 2},
       {"kind": "train", "step": 3}, {"kind": "train", "step": 4}]


def test_truncate_keeps_records_up_to_the_step_and_drops_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, RUN, tail=b'{"kind": "train", "st')            # killed mid-write
    assert truncate_metrics(path, 2) == 3
    assert _steps(path) == [("train", 1), ("train", 2), ("eval", 2)]
    _write(path, RUN, tail=b"\xff\xfe garbage\n")
    assert truncate_metrics(path, 0) == 0 and path.read_bytes() == b""
    assert truncate_metrics(tmp_path / "absent.jsonl", 3) == 0 and not (tmp_path / "absent.jsonl").exists()


def test_a_resumed_logger_never_repeats_a_step(tmp_path):
    _write(tmp_path / "metrics.jsonl", RUN)
    logger = MetricsLogger(tmp_path, enabled=True, total_steps=5, initial_step=2, tensorboard=False,
                           progress_bar=False)
    for step in (3, 4, 5):
        logger.log({"kind": "train", "step": step, "loss": float("nan")})
    logger.close()
    assert _steps(tmp_path / "metrics.jsonl") == [("train", 1), ("train", 2), ("eval", 2), ("train", 3),
                                                  ("train", 4), ("train", 5)]
    MetricsLogger(tmp_path, enabled=False, total_steps=5, initial_step=0).close()   # other ranks touch nothing
    assert len(_steps(tmp_path / "metrics.jsonl")) == 6
