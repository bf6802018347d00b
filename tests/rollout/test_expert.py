"""The oracle as a writer of turns (gopd_fast.rollout.expert): token-exact expert episodes and the oracle's text."""
from __future__ import annotations

import pytest

from gopd_fast.rollout.episode import Role
from gopd_fast.rollout.expert import ACTION_FORMAT, oracle_episodes, oracle_text, random_episodes


def test_oracle_episodes_are_token_exact_expert_turns(household_chat):
    env, tok, chat = household_chat
    eps = oracle_episodes(env, env.tasks("train")[:5], chat)
    for ep in eps:
        assert ep.success and ep.score == 100.0
        assert all(r == Role.TEACHER for r in ep.turn_roles)
        for (a, b), action in zip(ep.turn_spans, ep.actions):
            assert tok.decode(ep.token_ids[a:b]) == ACTION_FORMAT.format(action=action) + tok.eos_token
        # only the turns carry loss roles; everything else is context
        in_turn = {i for a, b in ep.turn_spans for i in range(a, b)}
        assert all((r != Role.CONTEXT) == (i in in_turn) for i, r in enumerate(ep.roles))
        # the whole history equals the chat-template rendering of the conversation
        msgs = []
        env.reset(ep.task_id)
        first = env.reset(ep.task_id).observation
        msgs.append({"role": "user", "content": first})
        for action in ep.actions:
            obs = env.step(action).observation
            msgs += [{"role": "assistant", "content": ACTION_FORMAT.format(action=action)},
                     {"role": "user", "content": obs}]
        text = tok.apply_chat_template(msgs[:-1], tokenize=False, enable_thinking=False)
        assert tok.decode(ep.token_ids) + "\n" == text.replace("<|im_start|>assistant\nAction", "<|im_start|>"
                                                               "assistant\n<think>\n\n</think>\n\nAction")


def test_noise_turns_are_student_role_and_recovered(household_chat):
    env, _, chat = household_chat
    eps = oracle_episodes(env, env.tasks("train")[:30], chat, noise=0.3, seed=1)
    noisy = [ep for ep in eps if Role.STUDENT in ep.turn_roles]
    assert noisy, "noise=0.3 over 30 episodes must inject some non-expert turns"
    assert sum(ep.success for ep in noisy) >= len(noisy) // 2   # the oracle recovers from most mistakes
    with pytest.raises(ValueError, match="noise"):
        oracle_episodes(env, env.tasks("train")[:1], chat, noise=1.0)


def test_oracle_text_is_the_oracle_runs_observations_and_actions(household_chat, oracle_replay):
    env, _, _ = household_chat
    tasks = env.tasks("train")[:3]
    text = oracle_text(env, tasks)
    want = oracle_replay(env, tasks)   # an independent replay of the oracle
    assert text == want
    noisy = oracle_text(env, tasks, noise=0.5, seed=1)
    assert noisy != text and noisy == oracle_text(env, tasks, noise=0.5, seed=1)   # seeded, and it deviates
    with pytest.raises(ValueError, match="noise"):
        oracle_text(env, tasks, noise=-0.1)


def test_the_trainer_expert_source_renders_with_it(household_chat):
    """ExpertSource (rollout.engine = "expert") serves exactly the episodes oracle_episodes renders."""
    from gopd_fast.train_setup import ExpertSource

    env, tok, chat = household_chat
    tasks = env.tasks("train")[:2]
    got = ExpertSource(env, tok).collect(tasks, beta=0.0, temperature=1.0, seed=0)
    assert [e.token_ids for e in got] == [e.token_ids for e in oracle_episodes(env, tasks, chat)]


def test_random_episodes_take_admissible_actions_as_student_turns(household_chat):
    env, _, chat = household_chat
    eps = random_episodes(env, env.tasks("train")[:6], chat, seed=2)
    again = random_episodes(env, env.tasks("train")[:6], chat, seed=2)
    assert [e.actions for e in eps] == [e.actions for e in again]           # seeded
    assert any(e.actions != o.actions for e, o in zip(eps, oracle_episodes(env, env.tasks("train")[:6], chat)))
    for ep in eps:
        assert all(r == Role.STUDENT for r in ep.turn_roles)
        env.reset(ep.task_id)
        admissible = env.reset(ep.task_id).admissible_actions
        for action in ep.actions:                                           # each action was admissible
            assert action in admissible
            admissible = env.step(action).admissible_actions
        assert ep.rounds == 15 or ep.success
