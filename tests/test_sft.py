"""Oracle-episode rendering and the SFT loop (gopd_fast.sft)."""
from __future__ import annotations

import pytest
import torch

from gopd_fast import envs
from gopd_fast.models import build_model, config_for_tokenizer, train_tokenizer
from gopd_fast.rollout.episode import Role
from gopd_fast.rollout.history import ChatFormat
from gopd_fast.sft import ACTION_FORMAT, SFTConfig, collate, oracle_episodes, train_sft


@pytest.fixture(scope="module")
def setup():
    env = envs.make("household", seed=3, max_turns=15)
    corpus = []
    for t in env.tasks("train")[:20]:
        corpus.append(env.reset(t).observation)
        done = False
        while not done:
            a = env.expert_action()
            s = env.step(a)
            corpus += [ACTION_FORMAT.format(action=a), s.observation]
            done = s.done
    tok = train_tokenizer(corpus, vocab_size=400)
    return env, tok, ChatFormat(tok)


def test_oracle_episodes_are_token_exact_expert_turns(setup):
    env, tok, chat = setup
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


def test_noise_turns_are_student_role_and_recovered(setup):
    env, _, chat = setup
    eps = oracle_episodes(env, env.tasks("train")[:30], chat, noise=0.3, seed=1)
    noisy = [ep for ep in eps if Role.STUDENT in ep.turn_roles]
    assert noisy, "noise=0.3 over 30 episodes must inject some non-expert turns"
    assert sum(ep.success for ep in noisy) >= len(noisy) // 2   # the oracle recovers from most mistakes
    with pytest.raises(ValueError, match="noise"):
        oracle_episodes(env, env.tasks("train")[:1], chat, noise=1.0)


def test_collate_masks_roles_and_padding(setup):
    env, tok, chat = setup
    eps = oracle_episodes(env, env.tasks("train")[:3], chat, noise=0.3, seed=2)
    _, mask, labels = collate(eps, tok.pad_token_id, train_roles=(Role.TEACHER,))
    for row, ep in enumerate(eps):
        n = len(ep.token_ids)
        assert mask[row, :n].all() and not mask[row, n:].any()
        expect = [t if r == Role.TEACHER else -100 for t, r in zip(ep.token_ids, ep.roles)]
        assert labels[row, :n].tolist() == expect and (labels[row, n:] == -100).all()


def test_train_sft_lowers_the_loss(setup):
    env, tok, chat = setup
    eps = oracle_episodes(env, env.tasks("train")[:16], chat)
    model = build_model(config_for_tokenizer("student-tiny", tok), seed=0)
    losses = train_sft(model, eps, SFTConfig(steps=12, batch_size=8, lr=3e-3, warmup_steps=2), pad_id=tok.pad_token_id)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.75 * losses[0]
    with pytest.raises(ValueError, match="steps"):
        SFTConfig(steps=0)


def test_random_episodes_take_admissible_actions_as_student_turns(setup):
    from gopd_fast.sft import random_episodes

    env, _, chat = setup
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


def test_train_sft_resumes_from_its_checkpoint_to_the_same_weights(setup, tmp_path, monkeypatch):
    import gopd_fast.sft as sft_mod

    env, tok, chat = setup
    eps = oracle_episodes(env, env.tasks("train")[:8], chat)
    cfg = SFTConfig(steps=5, batch_size=3, lr=1e-2, warmup_steps=1, seed=0)
    pad = int(tok.pad_token_id)

    def model():
        return build_model(config_for_tokenizer("student-tiny", tok), seed=0)

    straight = model()
    train_sft(straight, eps, cfg, pad_id=pad)

    real_loss, calls = sft_mod.sft_loss, {"n": 0}

    def interrupted_loss(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated interruption in step 3")
        return real_loss(*args)

    ckpt = tmp_path / "sft.pt"
    monkeypatch.setattr(sft_mod, "sft_loss", interrupted_loss)
    with pytest.raises(KeyboardInterrupt):
        train_sft(model(), eps, cfg, pad_id=pad, checkpoint=ckpt, checkpoint_every=2)
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    monkeypatch.setattr(sft_mod, "sft_loss", real_loss)
    resumed = model()                                   # fresh weights: everything comes from the checkpoint
    losses = train_sft(resumed, eps, cfg, pad_id=pad, checkpoint=ckpt, checkpoint_every=2)
    assert len(losses) == cfg.steps
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ValueError, match="checkpoint"):
        train_sft(model(), eps, cfg, pad_id=pad, checkpoint_every=2)
