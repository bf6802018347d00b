"""Hidden states and lm_heads whose logits look like a trained LM's, and the statistics that say so.

The benchmark's older inputs (random normal hidden states and heads: logit std 2, median top-1 probability 0.0065)
are flatter than any trained model, which hides what a trained model's peaked distributions allow (CCE-style
skipping of negligible gradient tiles) and cost. ``realistic_inputs`` builds, per token:

* a Zipf unigram prior over the vocabulary (token id = frequency rank, as in BPE vocabularies, where early merges
  are the frequent ones), carried by one hidden dimension and one column of each head (a trained head's
  frequency direction);
* a handful of candidate next tokens, drawn from the same Zipf law, whose head rows are added to the hidden state
  with decreasing amplitudes: a few tokens hold most of the mass;
* small isotropic noise (the Zipf-like tail's spread).

The teacher uses its own random head (its own width) but the same candidates, with amplitudes perturbed and, for a
fraction of the tokens, its top two candidates swapped: the models agree on the top token most of the time.

``logit_statistics`` reports entropy, top-1 mass, top-1 agreement and the fraction of 128 x 128 (token x
vocabulary) tiles whose probabilities are all below 2^-12 under both models (the tiles a gradient filter could skip
in cross-entropy). ``python bench/realistic_logits.py`` prints them for the generator at a given shape, and
``--qwen`` for the demo's tiny Qwen3 teacher (``gopd_fast/assets/household-full-teacher``) and a briefly SFT-ed
student on household episodes, as a sanity check.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
from torch import Tensor

TILE = 128
NEGLIGIBLE = 2.0**-12


@dataclass(frozen=True)
class Shape:
    """How peaked and how alike the two models are (defaults: calibrated on the statistics below, see RESULTS.md)."""

    zipf_exponent: float = 1.0      # prior logit of rank r: -exponent * log(r + 1)
    candidates: int = 4             # tokens that each hidden state points at
    top_amplitude: tuple[float, float] = (4.0, 12.0)  # uniform range of the first candidate's logit boost
    decay: float = 0.8              # each further candidate's boost, relative to the previous one
    noise: float = 1.0              # std of the isotropic logit noise
    teacher_jitter: float = 1.0     # std of the teacher's perturbation of each candidate's boost
    swap_fraction: float = 0.1      # tokens whose teacher swaps the top two candidates


def _zipf_ids(n: int, vocab: int, exponent: float, g: torch.Generator) -> Tensor:
    weights = (torch.arange(vocab, dtype=torch.float32, device=g.device) + 1.0) ** -exponent
    return torch.multinomial(weights, n, replacement=True, generator=g)


def _head(vocab: int, width: int, prior: Tensor, g: torch.Generator) -> Tensor:
    """Unit-norm random rows in the first width - 1 dimensions; the last column carries the prior."""
    head = torch.randn(vocab, width, generator=g, dtype=prior.dtype, device=g.device)
    head[:, :-1] /= head[:, :-1].norm(dim=1, keepdim=True)
    head[:, -1] = prior
    return head


def _hidden(head: Tensor, ids: Tensor, boosts: Tensor, noise: float, g: torch.Generator) -> Tensor:
    """sum_k boost_k * head[id_k] (the candidate directions) + noise, with 1 in the prior dimension."""
    n, width = ids.shape[0], head.shape[1]
    hidden = torch.zeros(n, width - 1, dtype=head.dtype, device=head.device)
    for k in range(ids.shape[1]):  # one candidate at a time: no [n, k, width] temporary at N=16384, D=4096
        hidden += boosts[:, k, None] * head[ids[:, k], :-1]
    hidden += noise * torch.randn(n, width - 1, generator=g, dtype=head.dtype, device=head.device)
    return torch.cat([hidden, torch.ones(n, 1, dtype=head.dtype, device=head.device)], dim=1)


def realistic_inputs(n: int, vocab: int, ds: int, dt: int, *, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu", seed: int = 0, shape: Shape = Shape()) -> dict[str, Tensor]:
    """{"hs": [n, ds], "ws": [vocab, ds], "ht": [n, dt], "wt": [vocab, dt]} in ``dtype`` on ``device``, built there
    (float64 on CPU, float32 on a GPU: the target shape's heads are 5 GB in float64; the draws differ by device)."""
    if min(n, vocab) < 1 or min(ds, dt) < 2:
        raise ValueError(f"need n, vocab >= 1 and ds, dt >= 2, got n={n}, vocab={vocab}, ds={ds}, dt={dt}")
    device = torch.device(device)
    work = torch.float64 if device.type == "cpu" else torch.float32
    g = torch.Generator(device=device).manual_seed(seed)
    prior = -shape.zipf_exponent * torch.log(torch.arange(vocab, dtype=work, device=device) + 1.0)
    prior -= prior.mean()
    ws, wt = _head(vocab, ds, prior, g), _head(vocab, dt, prior, g)
    ids = _zipf_ids(n * shape.candidates, vocab, shape.zipf_exponent, g).view(n, shape.candidates)
    lo, hi = shape.top_amplitude
    top = lo + (hi - lo) * torch.rand(n, 1, generator=g, dtype=work, device=device)
    boosts_s = top * shape.decay ** torch.arange(shape.candidates, dtype=work, device=device)
    boosts_t = boosts_s + shape.teacher_jitter * torch.randn(boosts_s.shape, generator=g, dtype=work, device=device)
    swap = torch.rand(n, generator=g, device=device) < shape.swap_fraction
    if shape.candidates > 1:
        boosts_t[swap, 0], boosts_t[swap, 1] = boosts_t[swap, 1].clone(), boosts_t[swap, 0].clone()
    hs = _hidden(ws, ids, boosts_s, shape.noise, g)
    ht = _hidden(wt, ids, boosts_t, shape.noise, g)
    return {k: v.to(dtype=dtype)
            for k, v in (("hs", hs), ("ws", ws), ("ht", ht), ("wt", wt))}


def logit_statistics(zs: Tensor, zt: Tensor, *, tile: int = TILE, negligible: float = NEGLIGIBLE,
                     chunk: int = 256) -> dict[str, float]:
    """Statistics of student / teacher logits [N, V] (token order as given), in chunks of ``chunk`` tokens."""
    if zs.shape != zt.shape or zs.dim() != 2:
        raise ValueError(f"zs and zt must be [N, V] of one shape, got {tuple(zs.shape)} and {tuple(zt.shape)}")
    n, vocab = zs.shape
    ent_s, ent_t, top_s, top_t, agree = [], [], [], [], []
    col_tiles = math.ceil(vocab / tile)
    quiet_tiles = 0
    for lo in range(0, n, tile):  # token tiles; chunks of whole tiles keep the tile count exact
        p_s = torch.softmax(zs[lo: lo + tile].double(), -1)
        p_t = torch.softmax(zt[lo: lo + tile].double(), -1)
        for p, ent, top in ((p_s, ent_s, top_s), (p_t, ent_t, top_t)):
            ent.append(-(p * torch.log(p.clamp_min(1e-300))).sum(-1))
            top.append(p.max(-1).values)
        agree.append(p_s.argmax(-1) == p_t.argmax(-1))
        loud = torch.maximum(p_s, p_t).max(0).values >= negligible  # [V]: any token of the tile above the line
        pad = col_tiles * tile - vocab
        loud = torch.nn.functional.pad(loud, (0, pad)).view(col_tiles, tile).any(-1)
        quiet_tiles += int((~loud).sum())
    ent_s, ent_t, top_s, top_t = (torch.cat(x) for x in (ent_s, ent_t, top_s, top_t))
    return {
        "tokens": n, "vocab": vocab,
        "entropy_student_mean": ent_s.mean().item(), "entropy_teacher_mean": ent_t.mean().item(),
        "top1_student_median": top_s.median().item(), "top1_teacher_median": top_t.median().item(),
        "top1_student_mean": top_s.mean().item(), "top1_teacher_mean": top_t.mean().item(),
        "top1_agreement": torch.cat(agree).double().mean().item(),
        "quiet_tile_fraction": quiet_tiles / (math.ceil(n / tile) * col_tiles),
    }


def format_statistics(name: str, stats: dict[str, float]) -> str:
    return (f"| {name} | {stats['tokens']} x {stats['vocab']} | {stats['entropy_student_mean']:.2f} / "
            f"{stats['entropy_teacher_mean']:.2f} | {stats['top1_student_median']:.3f} / "
            f"{stats['top1_teacher_median']:.3f} | {stats['top1_agreement']:.3f} | "
            f"{stats['quiet_tile_fraction']:.3f} |")


HEADER = ("| inputs | N x V | entropy, nats (student / teacher, mean) | top-1 probability (median) | top-1 agreement "
          "| tiles all < 2^-12 |\n|---|---|---|---|---|---|")


def generator_statistics(n: int, vocab: int, ds: int, dt: int, seed: int = 0) -> dict[str, float]:
    p = realistic_inputs(n, vocab, ds, dt, dtype=torch.float64, seed=seed)
    return logit_statistics(p["hs"] @ p["ws"].T, p["ht"] @ p["wt"].T)


def flat_statistics(n: int, vocab: int, ds: int, dt: int, seed: int = 0) -> dict[str, float]:
    """The benchmark's older inputs (bench/test_bench_fused_linear_kl.py's scale), for comparison."""
    g = torch.Generator().manual_seed(seed)
    hs, ht = torch.randn(n, ds, generator=g), torch.randn(n, dt, generator=g)
    ws, wt = torch.randn(vocab, ds, generator=g) * 2 / ds**0.5, torch.randn(vocab, dt, generator=g) * 2 / dt**0.5
    return logit_statistics(hs @ ws.T, ht @ wt.T)


def qwen_statistics(episodes: int = 8, student_steps: int = 40) -> dict[str, float]:
    """The demo's committed tiny teacher and a student SFT-ed as the demo's student-base (``student_steps`` steps),
    teacher-forced on household oracle episodes of the eval split: logits at every position."""
    from gopd_fast.demo import run as demo
    from gopd_fast.demo.sft import SFTConfig, train_sft
    from gopd_fast.models import load_model
    from gopd_fast.rollout.expert import oracle_episodes
    from gopd_fast.train_setup import make_env

    cfg = demo.DemoConfig()
    teacher, tokenizer = load_model(demo.ASSETS_DIR / cfg.teacher.asset)
    env = make_env(demo.env_config(cfg))
    try:
        held_out = oracle_episodes(env, env.tasks("eval")[:episodes], demo.chat_format(tokenizer), noise=0.0)
        base = oracle_episodes(env, env.tasks("train")[-cfg.student.base_episodes:], demo.chat_format(tokenizer))
    finally:
        env.close()
    s = cfg.student
    student = demo._new_model(s.size, s.num_hidden_layers, tokenizer, s.seed)
    train_sft(student, base, SFTConfig(steps=student_steps, batch_size=s.batch_size, lr=s.lr, seed=s.seed),
              pad_id=int(tokenizer.pad_token_id), log=lambda *_: None)
    student.eval()
    zs, zt = [], []
    with torch.no_grad():
        for episode in held_out:
            ids = torch.tensor([episode.token_ids])
            zs.append(student(ids).logits[0].float())
            zt.append(teacher(ids).logits[0].float())
    return logit_statistics(torch.cat(zs), torch.cat(zt))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--ds", type=int, default=1024)
    parser.add_argument("--dt", type=int, default=2048)
    parser.add_argument("--qwen", action="store_true", help="also the demo's tiny Qwen3 teacher and student")
    args = parser.parse_args(argv)
    print(HEADER)
    print(format_statistics("realistic_inputs", generator_statistics(args.n, args.vocab, args.ds, args.dt)))
    print(format_statistics("flat (older bench inputs)", flat_statistics(args.n, args.vocab, args.ds, args.dt)))
    if args.qwen:
        print(format_statistics("demo tiny Qwen3 student / teacher", qwen_statistics()))


if __name__ == "__main__":
    main()
