"""The failure-mode diagnostic's pieces (gopd_fast.demo.diagnostics) against independent float64 references."""
from __future__ import annotations

import math

import pytest
import torch

from gopd_fast import envs
from gopd_fast.demo.diagnostics import failure_mode, replay, score_at_turn_limits, turn_signals
from gopd_fast.models import build_model, config_for_tokenizer, train_tokenizer
from gopd_fast.rollout.expert import ACTION_FORMAT, oracle_episodes
from gopd_fast.rollout.history import ChatFormat


@pytest.fixture(scope="module")
def setup():
    env = envs.make("household", seed=5, max_turns=15)
    corpus = [env.reset(t).observation for t in env.tasks("train")[:10]] + ["Action: go to kitchen"]
    tok = train_tokenizer(corpus, vocab_size=350)
    chat = ChatFormat(tok)
    student = build_model(config_for_tokenizer("student-tiny", tok), seed=0)
    teacher = build_model(config_for_tokenizer("teacher-tiny", tok), seed=1)
    return env, tok, chat, student, teacher


def test_replay_labels_the_expert_path_as_on_path(setup):
    env, _, chat, _, _ = setup
    ep = oracle_episodes(env, env.tasks("eval")[:1], chat)[0]
    states = replay(env, ep)
    assert [s.off_path for s in states] == [0] * len(states)
    assert [s.distance for s in states] == list(range(len(states), 0, -1))
    assert states[-1].score_after == 100.0
    limits = score_at_turn_limits(states, [1, len(states), len(states) + 5])
    assert limits[len(states)] == limits[len(states) + 5] == 100.0 and limits[1] <= 100.0


def test_replay_counts_extra_steps_off_the_path(setup):
    env, _, chat, _, _ = setup
    ep = oracle_episodes(env, env.tasks("eval")[:40], chat, noise=0.5, seed=3)
    checked = 0
    for e in ep:
        states = replay(env, e)
        assert states[0].off_path == 0
        for s in states:
            assert s.off_path is not None and s.off_path >= 0
        checked += any(s.off_path > 0 for s in states)
    assert checked > 0, "random detours must put some states off the expert path"


def test_turn_signals_match_a_float64_reference(setup):
    env, _, chat, student, teacher = setup
    ep = oracle_episodes(env, env.tasks("eval")[:1], chat)[0]
    sig = turn_signals(student, teacher, ep)
    ids = torch.tensor([ep.token_ids])
    with torch.no_grad():
        ls = torch.log_softmax(student(input_ids=ids).logits[0].double(), -1)
        lt = torch.log_softmax(teacher(input_ids=ids).logits[0].double(), -1)
    for (a, b), row in zip(ep.turn_spans, sig):
        pos = torch.arange(a - 1, b - 1)
        kl = (ls[pos].exp() * (ls[pos] - lt[pos])).sum(-1).mean()
        assert math.isclose(row["kl_student_teacher"], float(kl), rel_tol=1e-3, abs_tol=1e-5)
        assert math.isclose(row["teacher_maxprob"], float(lt[pos].max(-1).values.exp().mean()), rel_tol=1e-4)
        ent = -(lt[pos].exp() * lt[pos]).sum(-1).mean()
        assert math.isclose(row["teacher_entropy"], float(ent), rel_tol=1e-4)


def test_failure_mode_aggregates_and_identical_models_have_zero_kl(setup):
    env, tok, chat, _, teacher = setup
    eps = oracle_episodes(env, env.tasks("eval")[:4], chat, noise=0.3, seed=4)
    eos = [tok.eos_token_id]

    def encode(action: str) -> list[int]:
        return list(tok(ACTION_FORMAT.format(action=action), add_special_tokens=False)["input_ids"]) + eos

    out = failure_mode(teacher, teacher, env, {"student": eps[:2], "teacher": eps[2:]}, encode)
    assert len(out["states"]) == sum(len(e.actions) for e in eps)
    for rows in out["by_turn"].values():
        assert sum(r["states"] for r in rows) > 0
        assert all(abs(r["kl_student_teacher"]) < 1e-5 for r in rows)
        assert all(0.0 <= r["teacher_p_oracle_action"] <= 1.0 for r in rows)
    assert sum(r["states"] for r in out["by_distance"]) == len(out["states"])


class _WithoutDistance:
    """The env minus ``expert_distance`` (as TextWorldExpress and ScienceWorld: no oracle from arbitrary states)."""

    def __init__(self, env) -> None:
        self._env = env

    def __getattr__(self, name: str):
        if name == "expert_distance":
            raise AttributeError(name)
        return getattr(self._env, name)


def test_off_path_fraction_is_unknown_without_an_oracle_distance(setup):
    env, tok, chat, _, teacher = setup
    eps = oracle_episodes(env, env.tasks("eval")[:2], chat, noise=0.3, seed=4)

    def encode(action: str) -> list[int]:
        return list(tok(ACTION_FORMAT.format(action=action), add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]

    known = failure_mode(teacher, teacher, env, {"student": eps}, encode)
    assert all(0.0 <= r["off_path_fraction"] <= 1.0 for r in known["by_turn"]["student"])
    unknown = failure_mode(teacher, teacher, _WithoutDistance(env), {"student": eps}, encode)
    assert all(math.isnan(r["off_path_fraction"]) for r in unknown["by_turn"]["student"])   # not a fake 0.0
    assert sum(r["states"] for r in unknown["by_distance"]) == 0
