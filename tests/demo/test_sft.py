"""The demo's SFT loop (gopd_fast.demo.sft) on oracle episodes."""
from __future__ import annotations

import pytest
import torch

from gopd_fast.demo.sft import SFTConfig, collate, train_sft
from gopd_fast.models import build_model, config_for_tokenizer
from gopd_fast.rollout.episode import Role
from gopd_fast.rollout.expert import oracle_episodes


def test_collate_masks_roles_and_padding(household_chat):
    env, tok, chat = household_chat
    eps = oracle_episodes(env, env.tasks("train")[:3], chat, noise=0.3, seed=2)
    _, mask, labels = collate(eps, tok.pad_token_id, train_roles=(Role.TEACHER,))
    for row, ep in enumerate(eps):
        n = len(ep.token_ids)
        assert mask[row, :n].all() and not mask[row, n:].any()
        expect = [t if r == Role.TEACHER else -100 for t, r in zip(ep.token_ids, ep.roles)]
        assert labels[row, :n].tolist() == expect and (labels[row, n:] == -100).all()


def test_train_sft_lowers_the_loss(household_chat):
    env, tok, chat = household_chat
    eps = oracle_episodes(env, env.tasks("train")[:16], chat)
    model = build_model(config_for_tokenizer("student-tiny", tok), seed=0)
    losses = train_sft(model, eps, SFTConfig(steps=12, batch_size=8, lr=3e-3, warmup_steps=2), pad_id=tok.pad_token_id)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.75 * losses[0]
    with pytest.raises(ValueError, match="steps"):
        SFTConfig(steps=0)


def test_train_sft_resumes_from_its_checkpoint_to_the_same_weights(household_chat, tmp_path, monkeypatch):
    import gopd_fast.demo.sft as sft_mod

    env, tok, chat = household_chat
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
