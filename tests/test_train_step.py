"""Trainer (gopd_fast.train_step): the frozen teacher's lean forward (``_lean_teacher``) against the module's."""
from __future__ import annotations

import copy

import pytest
import torch

from gopd_fast.config import load_config
from gopd_fast.distributed import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TEACHER = "gopd_fast/assets/household-full-teacher"


@pytest.fixture(scope="module")
def setup():
    from gopd_fast.rollout.history import ChatFormat
    from gopd_fast.train import expert_episode, load_models, make_env

    cfg = load_config(None, [f"model.student={TEACHER}", f"model.teacher={TEACHER}", "env.max_turns=4",
                             "model.attn_implementation=packed_sdpa"])
    student, teacher, tok = load_models(cfg, CPU)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # a student that differs from the teacher: a loss well away from 0
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    env = make_env(cfg)
    episodes = [expert_episode(env, t, ChatFormat(tok), tok.eos_token_id) for t in env.tasks("train")[:3]]
    return cfg, student, teacher, tok, episodes


def test_lean_teacher_step_equals_the_module_step(setup):
    """With "packed_sdpa" on one CPU process the teacher runs through ``Qwen3Decoder.encode``; the step's loss
    and gradient norm are the module forward's up to float rounding."""
    from gopd_fast.train import Trainer

    cfg, student, teacher, tok, episodes = setup
    lean = Trainer(cfg, CPU, copy.deepcopy(student), teacher, pad_token_id=tok.pad_token_id)
    plain = Trainer(cfg, CPU, copy.deepcopy(student), teacher, pad_token_id=tok.pad_token_id)
    assert lean.teacher_encoder is not None
    plain.teacher_encoder = None                 # the module forward, as with any other attention choice
    a, b = lean.step(episodes), plain.step(episodes)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_lean_teacher_only_for_packed_sdpa(setup):
    from gopd_fast.train import Trainer

    cfg, student, teacher, tok, _ = setup
    dense = copy.deepcopy(teacher)
    dense.config._attn_implementation = "sdpa"
    assert Trainer(cfg, CPU, student, dense, pad_token_id=tok.pad_token_id).teacher_encoder is None
