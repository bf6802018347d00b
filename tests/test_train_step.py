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


def test_rollout_teacher_hidden_step_equals_the_teacher_forward(setup):
    """``rollout.reuse_teacher_hidden``: the teacher engine of a guided rollout keeps its final hidden states and
    the step takes them instead of running the teacher over every episode; loss and gradient norm are the
    teacher forward's up to float rounding."""
    from gopd_fast.train import RolloutSource, Trainer, teacher_hidden

    cfg, student, teacher, tok, _ = setup
    source = RolloutSource(cfg, tok, CPU)
    try:
        episodes = source.collect(source_tasks(cfg), beta=0.5, temperature=1.0, seed=0)
        assert 0 < sum(e.teacher_turn_fraction for e in episodes) < len(episodes), "both models must write"
        reuse = Trainer(cfg, CPU, copy.deepcopy(student), teacher, pad_token_id=tok.pad_token_id)
        forward = Trainer(cfg, CPU, copy.deepcopy(student), teacher, pad_token_id=tok.pad_token_id)
        assert reuse.takes_teacher_hidden
        source.check_teacher(reuse.teacher)
        hidden = teacher_hidden(reuse, source, episodes)
        assert hidden is not None and len(hidden) == len(episodes)
        a, b = reuse.step(episodes, teacher_hidden=hidden), forward.step(episodes)
    finally:
        source.close()
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def source_tasks(cfg):
    from gopd_fast.train import make_env

    env = make_env(cfg)
    try:
        return env.tasks("train")[:4]
    finally:
        env.close()


def test_teacher_hidden_only_where_it_is_the_teacher_forward(setup):
    """One rule (train_setup.teacher_hidden_from_rollout) for the source (keep the states) and the trainer
    (take them): off with the switch, re-encoding rollouts, a teacher server, bf16 or several processes; a
    trainer that does not take them refuses them; a teacher engine with other weights is refused."""
    from gopd_fast.config import load_config as load
    from gopd_fast.train import RolloutSource, Trainer
    from gopd_fast.train_setup import teacher_hidden_from_rollout

    cfg, student, teacher, tok, episodes = setup
    assert teacher_hidden_from_rollout(cfg, CPU)
    base = [f"model.student={TEACHER}", f"model.teacher={TEACHER}", "env.max_turns=4"]
    for override in ("rollout.reuse_teacher_hidden=false", "rollout.kv_reuse=false", "model.dtype=bfloat16",
                     "rollout.teacher_server=http://127.0.0.1:9", "rollout.engine=expert",
                     "rollout.engine=vllm"):
        assert not teacher_hidden_from_rollout(load(None, [*base, override]), CPU), override
    two = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    assert not teacher_hidden_from_rollout(cfg, two)
    off = load(None, [*base, "model.attn_implementation=packed_sdpa", "rollout.reuse_teacher_hidden=false"])
    trainer = Trainer(off, CPU, copy.deepcopy(student), teacher, pad_token_id=tok.pad_token_id)
    assert not trainer.takes_teacher_hidden
    fake = [torch.zeros(len(e.token_ids), teacher.config.hidden_size) for e in episodes]
    with pytest.raises(ValueError, match="teacher_hidden: given, but this trainer runs its teacher forward"):
        trainer.step(episodes, teacher_hidden=fake)
    on = Trainer(cfg, CPU, copy.deepcopy(student), teacher, pad_token_id=tok.pad_token_id)
    with pytest.raises(ValueError, match=r"teacher_hidden: expected float32 \[tokens, 128\]"):
        on.step(episodes, teacher_hidden=[x[:, :64] for x in fake])
    source = RolloutSource(cfg, tok, CPU)
    try:
        with pytest.raises(ValueError, match="rollout.reuse_teacher_hidden: the teacher engine's weights differ"):
            source.check_teacher(student)
    finally:
        source.close()
