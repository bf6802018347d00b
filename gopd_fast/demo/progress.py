"""The demo's live progress: tqdm bars on stderr and a tail of a trainer run's ``metrics.jsonl``.

Bars go to stderr so the ``[demo] ...`` lines on stdout stay parseable; lines printed while a bar is open go
through ``say`` (``tqdm.write``), which clears the bar, prints to stdout and redraws it.
"""
from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm


def say(line: str) -> None:
    """Print one log line to stdout without tearing an open progress bar."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


class Bar:
    """One tqdm bar on stderr whose postfix is ``status()`` (elapsed / planned seconds), refreshed on every advance
    and at least once a second by tqdm itself."""

    def __init__(self, total: int, desc: str, unit: str, status: Callable[[], str]) -> None:
        if total < 0:
            raise ValueError(f"Bar: total must be >= 0, got {total}")
        self.status = status
        # disable=False: bars also when stderr is not a terminal (a log file, the tests' capture)
        self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=False, dynamic_ncols=True,
                         leave=True, mininterval=0.5, bar_format="{desc}: {n_fmt}/{total_fmt} {unit} "
                         "|{bar:20}| {postfix}")
        self._bar.set_postfix_str(status(), refresh=True)

    def advance(self, n: int = 1) -> None:
        self._bar.set_postfix_str(self.status(), refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.set_postfix_str(self.status(), refresh=False)
        self._bar.close()

    def __enter__(self) -> Bar:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MetricsTail:
    """Follows ``metrics.jsonl`` of a trainer run in a background thread while the trainer runs in this one:
    ``on_record`` gets every new complete JSON line (train and eval records), in order. ``stop`` reads what is left
    and joins, so no record written before it is missed. The trainer flushes each record as it logs it."""

    def __init__(self, path: Path, on_record: Callable[[dict[str, Any]], None], poll_s: float = 0.5) -> None:
        if poll_s <= 0:
            raise ValueError(f"MetricsTail: poll_s must be > 0, got {poll_s}")
        self.path, self.on_record, self.poll_s = Path(path), on_record, poll_s
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"tail:{self.path.parent.name}", daemon=True)
        self.error: BaseException | None = None

    def _read_new(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1        # a line still being written waits for the next poll
        self._offset += end
        for line in chunk[:end].splitlines():
            if line.strip():
                self.on_record(json.loads(line))

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.poll_s):
                self._read_new()
            self._read_new()
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread by stop())
            self.error = e

    def __enter__(self) -> MetricsTail:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"following {self.path} failed: {self.error!r}") from self.error


class LiveCurves:
    """Held-out learning-curve points as the trainers log them: each printed as one parseable line
    (``[demo] curve METHOD seed S step K/N: Score M [LOW, HIGH] (E episodes)``) and the figure at ``out`` redrawn
    (``plots.plot_live_curves``), so it can be opened while the demo runs."""

    def __init__(self, out: Path, total_steps: int, reference: dict[str, float] | None = None) -> None:
        self.out, self.total_steps, self.reference = Path(out), total_steps, dict(reference or {})
        self.points: dict[str, dict[str, list[tuple[float, float, float, float]]]] = {}

    def add(self, method: str, seed: int, step: int, score: float, low: float, high: float, episodes: int,
            *, echo: bool = True) -> None:
        self.points.setdefault(method, {}).setdefault(f"seed{seed}", []).append((step, score, low, high))
        if echo:
            say(f"[demo] curve {method} seed {seed} step {step}/{self.total_steps}: Score {score:.1f} "
                f"[{low:.1f}, {high:.1f}] ({episodes} episodes)")
        self.redraw()

    def add_record(self, method: str, seed: int, record: dict[str, Any]) -> None:
        """A trainer eval record (``kind == "eval"``, keys ``eval/score``, ``eval/score_low``, ...)."""
        if "eval/score" not in record:   # an evaluation with no episodes has no Score
            say(f"[demo] curve {method} seed {seed} step {record.get('step')}: no episodes")
            return
        self.add(method, seed, int(record["step"]), float(record["eval/score"]), float(record["eval/score_low"]),
                 float(record["eval/score_high"]), int(record["eval/episodes"]))

    def redraw(self) -> Path:
        from gopd_fast.demo import plots

        return plots.plot_live_curves(self.points, self.out, reference=self.reference)
