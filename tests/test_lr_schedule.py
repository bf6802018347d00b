"""The one learning-rate schedule: warmup, then constant / cosine / linear decay to the floor; shared by the
trainer's LambdaLR and the in-process SFT loop."""
from __future__ import annotations

import math

import pytest
import torch

from gopd_fast.config import OptimConfig
from gopd_fast.lr_schedule import lr_factor


def test_warmup_then_each_decay_shape():
    kw = {"total_steps": 12, "warmup_steps": 2, "min_lr_ratio": 0.1}
    assert [lr_factor(s, schedule="cosine", **kw) for s in (0, 1)] == [0.5, 1.0]
    # cosine: 1 right after warmup, the midpoint halfway, the floor at the end and after it
    assert lr_factor(2, schedule="cosine", **kw) == 1.0
    assert lr_factor(7, schedule="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_factor(12, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(50, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(7, schedule="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert [lr_factor(s, schedule="constant", **kw) for s in (0, 5, 50)] == [0.5, 1.0, 1.0]


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_factor(0, total_steps=5, schedule="step")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        lr_factor(0, total_steps=5, min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="warmup_steps and total_steps"):
        lr_factor(0, total_steps=-1)


def test_the_trainer_and_sft_use_it():
    from gopd_fast.demo.sft import SFTConfig, _lr_at
    from gopd_fast.train_step import lr_lambda

    cfg = OptimConfig(lr=2e-3, lr_schedule="linear", warmup_steps=3, min_lr_ratio=0.2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, 10))
    got = []
    for _ in range(12):
        got.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    want = [cfg.lr * lr_factor(s, total_steps=10, warmup_steps=3, schedule="linear", min_lr_ratio=0.2)
            for s in range(12)]
    assert got == pytest.approx(want, rel=1e-12)
    sft = SFTConfig(steps=20, lr=3e-3, warmup_steps=4, min_lr_ratio=0.1)
    assert [_lr_at(s, sft) for s in range(25)] == [
        3e-3 * lr_factor(s, total_steps=20, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1) for s in range(25)]
