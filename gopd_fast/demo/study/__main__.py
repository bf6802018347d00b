"""python -m gopd_fast.demo.study --config configs/study.toml [--build-teacher | --select-lr | --aggregate]

    --build-teacher   train the committed teacher (gopd_fast/assets/<teacher.asset>; resumes from runs/)
    --select-lr       choose the learning rate on the validation split (writes <cells_dir>/../lr.json)
    (no flag)         every cell not yet finished, the diagnostics, then the aggregation
    --aggregate       only the aggregation: summary.json, tables.md, img/ next to the cells folder
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gopd_fast.demo.config import REPO_DIR


def main(argv: Sequence[str] | None = None) -> None:
    import torch

    from gopd_fast.demo.run import parse_seeds
    from gopd_fast.demo.study.config import load_study_config

    p = argparse.ArgumentParser(prog="python -m gopd_fast.demo.study", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default=str(REPO_DIR / "configs" / "study.toml"))
    phase = p.add_mutually_exclusive_group()
    phase.add_argument("--build-teacher", action="store_true", help="(re)build the committed teacher and exit")
    phase.add_argument("--select-lr", action="store_true", help="choose the lr on the validation split and exit")
    phase.add_argument("--aggregate", action="store_true", help="aggregate the finished cells and exit")
    p.add_argument("--only", default="", help="run only the cells whose name contains this (e.g. teacher__)")
    p.add_argument("--seeds", type=parse_seeds, default=None,
                   help="replace the config's seeds: a count (3) or a list (3,4,5); with --only, more seeds for some "
                        "cells (a cell's fingerprint does not include the seed list, and the report reads every cell)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = load_study_config(args.config)
    if args.seeds is not None:
        cfg = dataclasses.replace(cfg, seeds=args.seeds)
    if args.build_teacher:
        from gopd_fast.demo.study.teacher import build_teacher

        config = Path(args.config).resolve()
        if config.is_relative_to(REPO_DIR):   # the rebuild command, as a user in the repository types it
            config = config.relative_to(REPO_DIR)
        build_teacher(cfg, REPO_DIR / cfg.run_dir / "teacher", config=str(config))   # an absolute run_dir wins
        return
    from gopd_fast.demo.study import runner
    from gopd_fast.demo.study.cells import Study
    from gopd_fast.demo.study.select_lr import chosen_lr, select_lr

    study = Study(cfg)
    try:
        if args.select_lr:
            select_lr(study)
            return
        if not args.aggregate:
            runner.run_cells(study, chosen_lr(study), args.only)
            if not args.only:
                runner.run_diagnostics(study)
        runner.aggregate(study)
    finally:
        study.close()


if __name__ == "__main__":
    main(sys.argv[1:])
