"""Shared fixtures: a seeded generator, an independent float64 reference of the distillation loss, and a household
env with a tokenizer trained on its oracle text, and the trainer's tiny student and teacher on disk."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def _reference_loss(h_s, w_s, h_t, w_t, *, rw=None, fw=None, jsd_beta=None, temperature=1.0, b_s=None, b_t=None,
                    targets=None):
    """Per-token loss and stats from materialised float64 logits; plain softmax math, written independently of
    gopd_fast (mixture in probability space, log-softmax via logsumexp). Differentiable w.r.t. the student."""
    vocab = w_s.shape[0]
    z_s = h_s.double() @ w_s.double().T
    z_t = h_t.double() @ w_t[:vocab].double().T
    if b_s is not None:
        z_s = z_s + b_s.double()
    if b_t is not None:
        z_t = z_t + b_t[:vocab].double()
    logp_s = z_s / temperature - torch.logsumexp(z_s / temperature, -1, keepdim=True)
    logp_t = z_t / temperature - torch.logsumexp(z_t / temperature, -1, keepdim=True)
    p_s, p_t = logp_s.exp(), logp_t.exp()
    rkl = (p_s * (logp_s - logp_t)).sum(-1)
    fkl = (p_t * (logp_t - logp_s)).sum(-1)
    n = h_s.shape[0]
    rw = torch.ones(n, dtype=torch.float64) if rw is None else rw.double()
    fw = torch.zeros(n, dtype=torch.float64) if fw is None else fw.double()
    if jsd_beta is None:
        loss = rw * rkl + fw * fkl
    elif jsd_beta == 0:
        loss = rw * fkl
    elif jsd_beta == 1:
        loss = rw * rkl
    else:
        log_m = torch.log(jsd_beta * p_t + (1 - jsd_beta) * p_s)
        loss = rw * (jsd_beta * (p_t * (logp_t - log_m)).sum(-1) + (1 - jsd_beta) * (p_s * (logp_s - log_m)).sum(-1))
    stats = {"reverse_kl": rkl.detach(), "forward_kl": fkl.detach(),
             "student_entropy": -(p_s * logp_s).sum(-1).detach()}
    if targets is not None:
        stats["student_logprob"] = logp_s.gather(1, targets[:, None]).squeeze(1).detach()
        stats["teacher_logprob"] = logp_t.gather(1, targets[:, None]).squeeze(1).detach()
    return loss, stats


@pytest.fixture
def reference_loss():
    return _reference_loss


@pytest.fixture
def single_thread():
    """Run a test of tiny tensors on one intra-op thread (much faster on a loaded 2-core box), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _oracle_replay(env, tasks) -> list[str]:
    """The observations and action lines of noise-free oracle runs over ``tasks``, replayed step by step: written
    independently of gopd_fast.rollout.expert.oracle_text (the reference it is checked against)."""
    from gopd_fast.rollout.expert import ACTION_FORMAT

    texts: list[str] = []
    for t in tasks:
        texts.append(env.reset(t).observation)
        done = False
        while not done:
            a = env.expert_action()
            s = env.step(a)
            texts += [ACTION_FORMAT.format(action=a), s.observation]
            done = s.done
    return texts


@pytest.fixture
def oracle_replay():
    return _oracle_replay


@pytest.fixture(scope="module")
def household_chat():
    """(env, tokenizer, ChatFormat): household env (seed 3, 15 turns) and a 400-token tokenizer trained on the
    oracle text of its first 20 train tasks. Module scope: each test module gets a fresh env."""
    from gopd_fast import envs
    from gopd_fast.models import train_tokenizer
    from gopd_fast.rollout.history import ChatFormat

    env = envs.make("household", seed=3, max_turns=15)
    tok = train_tokenizer(_oracle_replay(env, env.tasks("train")[:20]), vocab_size=400)
    return env, tok, ChatFormat(tok)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> list[str]:
    """Config overrides that point model.student / model.teacher at freshly built tiny models (CPU)."""
    from gopd_fast.config import load_config
    from gopd_fast.distributed import DistInfo
    from gopd_fast.train import ensure_tiny_models

    root = tmp_path_factory.mktemp("models")
    overrides = [f"model.student={root}/student", f"model.teacher={root}/teacher"]
    ensure_tiny_models(load_config(None, overrides), DistInfo(rank=0, world_size=1, local_rank=0,
                                                              device=torch.device("cpu")))
    return overrides
