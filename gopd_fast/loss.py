"""``fused_linear_kl``: the distillation loss straight from hidden states, without [N, V] logits.

Per token i, with p_s = softmax((h_s W_s^T + b_s) / tau) and p_t = softmax((h_t W_t^T + b_t) / tau):

    loss_i = reverse_weight[i] * KL(p_s || p_t) + forward_weight[i] * KL(p_t || p_s)
    loss_i = reverse_weight[i] * JSD_beta(p_s, p_t)                        when jsd_beta is given

JSD follows TRL's and Liger's convention: beta=0 is forward KL, beta=1 is reverse KL. This module validates the
arguments once, drops zero-weight tokens before any vocabulary work, builds the one ``KLProblem`` every backend
takes (``gopd_fast.ops.problem``), runs the backend ``gopd_fast.ops.dispatch`` picks, and reduces. Tokens dropped
this way cost nothing and get exactly zero loss and zero gradient.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from gopd_fast.ops.autocast import autocast_cast, autocast_off
from gopd_fast.ops.checks import (
    check_bias,
    check_bool,
    check_int,
    check_probability,
    check_real,
    check_temperature,
)
from gopd_fast.ops.dispatch import (
    BACKEND_ENV,
    BACKENDS,
    backend_fn,
    check_backend,
    choose_backend,
    resolve_backend,
)
from gopd_fast.ops.precision import accumulation_dtype
from gopd_fast.ops.problem import KLProblem, build_problem

REDUCTIONS = ("mean", "sum", "none")

__all__ = ["BACKENDS", "BACKEND_ENV", "REDUCTIONS", "KLStats", "check_backend", "check_options",
           "fused_linear_kl", "resolve_backend"]


@dataclass(frozen=True)
class KLStats:
    """Per-token diagnostics computed in the same pass as the loss (detached, shaped like the hidden states'
    leading dims). Tokens with zero weight are not computed: their entries are 0 and ``token_mask`` is False."""

    reverse_kl: Tensor
    forward_kl: Tensor
    student_entropy: Tensor
    token_mask: Tensor
    student_logprob: Tensor | None = None  # log p_s(target), only with target_ids
    teacher_logprob: Tensor | None = None  # log p_t(target), only with target_ids


def fused_linear_kl(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    reverse_weight: Tensor | float | None = None,
    forward_weight: Tensor | float | None = None,
    jsd_beta: float | None = None,
    temperature: float = 1.0,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    target_ids: Tensor | None = None,
    reduction: str = "mean",
    normalizer: float | Tensor | None = None,
    backend: str = "auto",
    return_stats: bool = False,
    truncate_teacher_vocab: bool = False,
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> Tensor | tuple[Tensor, KLStats]:
    """Token-weighted KL / JSD between the student's and the teacher's next-token distributions.

    Args:
        student_hidden: [N, Ds] (or [*B, Ds]: leading dims are flattened) final hidden states of the student.
        student_weight: [V, Ds] student lm_head weight, same dtype as student_hidden. Gets a gradient.
        teacher_hidden: [N, Dt] (or [*B, Dt]) teacher hidden states at the same positions. Never gets a gradient.
        teacher_weight: [Vt, Dt] teacher lm_head weight. Vt == V, or Vt > V with ``truncate_teacher_vocab``.
        reverse_weight: [N] (or [*B]) weights >= 0 of KL(p_s||p_t), or of JSD with ``jsd_beta``. Bool masks are
            fine. Default: 1 on every token when both weights are None, else 0.
        forward_weight: [N] weights >= 0 of KL(p_t||p_s). Default 0. Not allowed together with ``jsd_beta``.
        jsd_beta: in [0, 1]: use the generalised JSD instead (beta=0 forward KL, beta=1 reverse KL).
        temperature: in [1e-4, 1e4] (``gopd_fast.ops.checks.TEMPERATURE_RANGE``); both models' logits are divided
            by it.
        student_bias / teacher_bias: optional [V] / [Vt] lm_head biases; -inf entries mask the vocabulary
            (``gopd_fast.ops`` states the rules), NaN/+inf entries are errors.
        target_ids: optional [N] integer ids in [0, V) (checked on weighted tokens only) for the log-prob stats.
        reduction: "mean" (sum over tokens / number of tokens with a nonzero weight, or / ``normalizer``), "sum",
            or "none" (per-token [N] or [*B] loss, 0 on zero-weight tokens).
        normalizer: with "mean", the denominator to use instead, e.g. the global loss-token count across
            gradient-accumulation steps and data-parallel ranks, so that many small batches equal one big one.
        backend: "auto" (CUDA tensors -> "triton", otherwise "chunked"; the environment variable GOPD_BACKEND
            overrides "auto"), "naive", "chunked" or "triton".
        return_stats: also return a ``KLStats``.
        truncate_teacher_vocab: allow Vt > V and use the teacher's first V rows (padded vocabularies, e.g. 152064
            vs 151936 rows).
        chunk_size: vocabulary tile of the chunked backend (default: about 4 Mi logits per tile); other backends
            choose their own tiles and ignore it.
        check_finite: raise on non-finite hidden states of weighted tokens or head weights, and on inputs whose
            logits, loss or gradients would overflow float32 (bounds ``LOGIT_LIMIT``, ``OVERFLOW_LIMIT``). False
            skips these checks (and their host syncs on GPU): NaN/inf then propagate into the loss, never into a
            finite wrong value.

    Returns:
        The loss (float32, float64 for float64 inputs), and with ``return_stats`` a ``(loss, KLStats)`` tuple.
        With a scalar reduction the backend computes the gradients during the forward pass (no logit recompute);
        a second backward through the same graph (``retain_graph=True``) accumulates them again, as for any loss.

    Mixed precision: under ``torch.autocast`` the logit GEMMs take their operands (hidden states, weights, biases)
    in the autocast dtype, like an ``nn.Linear``; softmax, KL and accumulation stay float32
    (``gopd_fast.ops.autocast``). Masked vocabularies: a -inf bias entry removes that entry from a model's
    distribution (``gopd_fast.ops`` states the rules); a per-token KL that is +inf because of it is returned as
    +inf with a ``RuntimeWarning`` naming the direction and the token count. With ``check_finite``, inputs whose
    logits, loss or gradients would overflow float32 are rejected with the bound they break.
    """
    # Under torch.autocast the logit GEMMs take autocast-dtype operands (as an nn.Linear would); the loss itself
    # then runs with autocast off and accumulates in float32 (gopd_fast.ops.autocast).
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = autocast_cast(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
    args = _validate(
        student_hidden, student_weight, teacher_hidden, teacher_weight, reverse_weight=reverse_weight,
        forward_weight=forward_weight, jsd_beta=jsd_beta, temperature=temperature, student_bias=student_bias,
        teacher_bias=teacher_bias, target_ids=target_ids, reduction=reduction, normalizer=normalizer,
        backend=backend, truncate_teacher_vocab=truncate_teacher_vocab, chunk_size=chunk_size,
        return_stats=return_stats, check_finite=check_finite,
    )
    tokens = _Tokens.of(args.reverse_weight, args.forward_weight, args.lead_shape)
    # drop zero-weight tokens before any vocabulary work
    h_s = tokens.take(student_hidden.reshape(tokens.n_tokens, student_hidden.shape[-1])).contiguous()
    h_t = tokens.take(teacher_hidden.detach().reshape(tokens.n_tokens, teacher_hidden.shape[-1])).contiguous()
    targets = None
    if target_ids is not None:
        targets = tokens.take(target_ids.reshape(tokens.n_tokens))
        _check_target_range(targets, args.vocab)
    if check_finite and tokens.n_active:
        for name, h in (("student_hidden", h_s), ("teacher_hidden", h_t)):
            if not bool(torch.isfinite(h).all()):
                raise ValueError(f"{name} has non-finite values (NaN/inf) at tokens with a nonzero loss weight; "
                                 "pass check_finite=False to let them propagate into the loss instead")

    denominator = float(normalizer) if normalizer is not None else float(max(tokens.n_active, 1))
    grad_scale = None if args.reduction == "none" else (1.0 / denominator if args.reduction == "mean" else 1.0)
    problem = build_problem(
        h_s, student_weight, h_t, teacher_weight, student_bias=student_bias, teacher_bias=teacher_bias,
        reverse_weight=tokens.take(args.reverse_weight), forward_weight=tokens.take(args.forward_weight),
        jsd_beta=args.jsd_beta, temperature=args.temperature, target_ids=targets, grad_scale=grad_scale,
        return_stats=return_stats, masked_vocab=args.masked_vocab)
    if problem.masked_vocab and problem.jsd_beta is None and not return_stats:
        problem = replace(problem, return_stats=True)  # the per-token KLs report a +inf KL (_check_result)

    if tokens.n_active == 0:  # all masked: an exact 0 that still reaches every student input with zero gradients
        zero = _connected_zero(student_hidden, student_weight, student_bias).to(problem.accumulation_dtype)
        if args.reduction == "none":
            zero = torch.zeros(tokens.lead_shape, dtype=zero.dtype, device=zero.device) + zero
        loss = zero
        stats = None
    else:
        if check_finite:
            _check_scale(problem, 1.0 if grad_scale is None else grad_scale)
        run = backend_fn(args.backend, chunk_size)
        with autocast_off(h_s.device):
            loss, stats = run(problem)
        _check_result(loss, stats, problem, args, check_finite)
        if args.reduction == "none":
            loss = tokens.scatter(loss)

    if not return_stats:
        return loss
    return loss, _make_stats(stats, tokens, problem.accumulation_dtype, with_targets=target_ids is not None)


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Checked:
    lead_shape: tuple[int, ...]
    n_tokens: int
    vocab: int
    reverse_weight: Tensor  # [N] accumulation dtype, finite, >= 0
    forward_weight: Tensor  # [N] accumulation dtype, finite, >= 0 (zeros with jsd_beta)
    jsd_beta: float | None  # in [0, 1]; build_problem maps the endpoints
    reduction: str
    backend: str
    temperature: float
    masked_vocab: bool  # some vocabulary entry has a -inf bias in the student's or the teacher's head


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t: object, ndim: int | None = None, min_ndim: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.ndim < min_ndim:
        raise ValueError(f"{name} must be at least {min_ndim}-D ([N, hidden] or [*batch, hidden]), "
                         f"got shape {tuple(t.shape)}")
    return t


def _check_float(name: str, t: Tensor) -> None:
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def _token_weight(name: str, value: object, lead_shape: tuple[int, ...], n_tokens: int, device,
                  dtype: torch.dtype) -> Tensor:
    if not isinstance(value, Tensor):
        number = check_real(name, value, low=0.0)
        value = torch.full((n_tokens,), number, dtype=dtype, device=device)
    if tuple(value.shape) not in (lead_shape, (n_tokens,)):
        raise ValueError(f"{name} must have shape {list(lead_shape)} (or [{n_tokens}]) to match the hidden states, "
                         f"got {list(value.shape)}")
    if value.dtype.is_complex:
        raise ValueError(f"{name} must be a real (float, int or bool) tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but student_hidden is on {device}; all inputs must share "
                         "one device")
    value = value.detach().reshape(n_tokens).to(dtype)
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite, got NaN/inf")
    if bool((value < 0).any()):
        raise ValueError(f"{name} must be >= 0, got a minimum of {value.min().item()}")
    return value


def _check_target_range(targets: Tensor, vocab: int) -> None:
    if targets.numel() and bool(((targets < 0) | (targets >= vocab)).any()):
        bad = targets[(targets < 0) | (targets >= vocab)][0].item()
        raise ValueError(f"target_ids must lie in [0, {vocab}) at tokens with a nonzero loss weight, got {bad}")


_SCALAR_DEFAULTS = {"jsd_beta": None, "temperature": 1.0, "reduction": "mean", "normalizer": None, "backend": "auto",
                    "return_stats": False, "truncate_teacher_vocab": False, "chunk_size": None, "check_finite": True}
_PER_TOKEN = ("reverse_weight", "forward_weight", "target_ids")


def check_options(**options: object) -> dict[str, object]:
    """The keyword options of ``fused_linear_kl`` other than tensors, validated (the one owner of these rules).

    ``FusedLinearKL`` and the compat classes call it at construction so that a bad default fails there, not at
    the first step. Unknown names are a TypeError; ``reverse_weight`` / ``forward_weight`` given as numbers are
    checked too (tensors are checked per call). Returns the options with numbers as floats/ints.
    """
    unknown = sorted(set(options) - set(_SCALAR_DEFAULTS) - set(_PER_TOKEN))
    if unknown:
        raise TypeError(f"unknown fused_linear_kl option(s) {unknown}; known: {sorted(_SCALAR_DEFAULTS)} and "
                        f"{list(_PER_TOKEN)}")
    out = dict(options)
    for name in ("return_stats", "truncate_teacher_vocab", "check_finite"):
        if name in out:
            check_bool(name, out[name])
    if out.get("jsd_beta") is not None:
        out["jsd_beta"] = check_probability("jsd_beta", out["jsd_beta"])
    if "temperature" in out:
        out["temperature"] = check_temperature(out["temperature"])
    reduction = out.get("reduction", "mean")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if out.get("normalizer") is not None:
        if reduction != "mean":
            raise ValueError(f"normalizer is only used with reduction='mean', got reduction={reduction!r}")
        out["normalizer"] = check_real("normalizer", out["normalizer"], low=0.0, low_open=True)
    if "backend" in out:
        check_backend(out["backend"])
    if out.get("chunk_size") is not None:
        out["chunk_size"] = check_int("chunk_size", out["chunk_size"], low=1)
    for name in ("reverse_weight", "forward_weight"):
        if out.get(name) is not None and not isinstance(out[name], Tensor):
            out[name] = check_real(name, out[name], low=0.0)
    if out.get("target_ids") is not None and not isinstance(out["target_ids"], Tensor):
        raise TypeError(f"target_ids must be an integer tensor, got {type(out['target_ids']).__name__}")
    return out


def _validate(student_hidden: object, student_weight: object, teacher_hidden: object, teacher_weight: object, *,
              reverse_weight: object, forward_weight: object, jsd_beta: object, temperature: object,
              student_bias: object, teacher_bias: object, target_ids: object, reduction: object, normalizer: object,
              backend: object, truncate_teacher_vocab: object, chunk_size: object, return_stats: object,
              check_finite: object) -> _Checked:
    """Every argument check of ``fused_linear_kl``, once; the per-token weights in the accumulation dtype."""
    check_bool("truncate_teacher_vocab", truncate_teacher_vocab)
    h_s = _check_tensor("student_hidden", student_hidden, min_ndim=2)
    h_t = _check_tensor("teacher_hidden", teacher_hidden, min_ndim=2)
    w_s = _check_tensor("student_weight", student_weight, ndim=2)
    w_t = _check_tensor("teacher_weight", teacher_weight, ndim=2)
    for name, t in (("student_hidden", h_s), ("teacher_hidden", h_t), ("student_weight", w_s),
                    ("teacher_weight", w_t)):
        _check_float(name, t)
    lead_shape = tuple(h_s.shape[:-1])
    if tuple(h_t.shape[:-1]) != lead_shape:
        raise ValueError(f"teacher_hidden must have the same leading (token) shape as student_hidden "
                         f"{list(lead_shape)}, got {list(h_t.shape[:-1])}")
    n_tokens = math.prod(lead_shape)
    vocab, vocab_t = w_s.shape[0], w_t.shape[0]
    if vocab == 0:
        raise ValueError("student_weight must have at least one row (the vocabulary), got shape [0, ...]")
    for role, h, w in (("student", h_s, w_s), ("teacher", h_t, w_t)):
        if w.shape[1] != h.shape[-1]:
            raise ValueError(f"{role}_weight must be [vocab, {h.shape[-1]}] to match {role}_hidden's hidden size, "
                             f"got {list(w.shape)}")
        if w.dtype != h.dtype:
            raise ValueError(f"{role}_weight dtype {w.dtype} differs from {role}_hidden dtype {h.dtype}; cast one "
                             "of them")
    if vocab_t < vocab:
        raise ValueError(f"teacher_weight has {vocab_t} rows but student_weight has {vocab}; the teacher vocabulary "
                         "must cover the student's")
    if vocab_t > vocab and not truncate_teacher_vocab:
        raise ValueError(f"teacher_weight has {vocab_t} rows but student_weight has {vocab}; pass "
                         f"truncate_teacher_vocab=True to use the shared first {vocab} rows")
    for name, bias, w in (("student_bias", student_bias, w_s), ("teacher_bias", teacher_bias, w_t)):
        if bias is not None:
            _check_tensor(name, bias, ndim=1)
            if bias.shape[0] != w.shape[0]:
                raise ValueError(f"{name} must have shape [{w.shape[0]}], got {list(bias.shape)}")
            if bias.dtype != w.dtype:
                raise ValueError(f"{name} dtype {bias.dtype} differs from its weight's dtype {w.dtype}")
    device = h_s.device
    named = [("teacher_hidden", h_t), ("student_weight", w_s), ("teacher_weight", w_t),
             ("student_bias", student_bias), ("teacher_bias", teacher_bias), ("target_ids", target_ids)]
    for name, t in named:
        if isinstance(t, Tensor) and t.device != device:
            raise ValueError(f"{name} is on {t.device} but student_hidden is on {device}; all inputs must share one "
                             "device")

    opts = check_options(jsd_beta=jsd_beta, temperature=temperature, reduction=reduction, normalizer=normalizer,
                         backend=backend, return_stats=return_stats, truncate_teacher_vocab=truncate_teacher_vocab,
                         chunk_size=chunk_size, check_finite=check_finite)
    jsd_beta, temperature = opts["jsd_beta"], opts["temperature"]
    if jsd_beta is not None and forward_weight is not None:
        raise ValueError("forward_weight is not used with jsd_beta; pass the per-token weights as reverse_weight")
    if target_ids is not None:
        _check_tensor("target_ids", target_ids)
        if target_ids.dtype.is_floating_point or target_ids.dtype.is_complex or target_ids.dtype == torch.bool:
            raise ValueError(f"target_ids must be an integer tensor (int64), got {target_ids.dtype}")
        if tuple(target_ids.shape) not in (lead_shape, (n_tokens,)):
            raise ValueError(f"target_ids must have shape {list(lead_shape)} (or [{n_tokens}]), "
                             f"got {list(target_ids.shape)}")
    concrete = choose_backend(backend, device, h_s.dtype)
    masked_vocab = False
    for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if bias is not None:
            masked_vocab |= check_bias(name, bias[:vocab])

    dtype = accumulation_dtype(h_s, h_t)  # weights stay exact for float64 inputs
    if reverse_weight is None and forward_weight is None:
        rw = torch.ones(n_tokens, dtype=dtype, device=device)
    else:
        rw = (torch.zeros(n_tokens, dtype=dtype, device=device) if reverse_weight is None
              else _token_weight("reverse_weight", reverse_weight, lead_shape, n_tokens, device, dtype))
    fw = (torch.zeros(n_tokens, dtype=dtype, device=device) if forward_weight is None
          else _token_weight("forward_weight", forward_weight, lead_shape, n_tokens, device, dtype))
    return _Checked(lead_shape, n_tokens, vocab, rw, fw, jsd_beta, reduction, concrete, temperature, masked_vocab)


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------
# |logit| / temperature above this is rejected: float32 no longer resolves logit differences of 1 beyond ~1.7e7,
# and the gradients (logit-sized factors times hidden states or weights) head for float32 overflow.
LOGIT_LIMIT = 1e8
# Bound on the loss and on every gradient entry (float32 overflows at 3.4e38; the bound leaves room for sums).
OVERFLOW_LIMIT = 1e30


def _check_scale(problem: KLProblem, scale: float) -> None:
    """Reject inputs whose logits, loss or gradients would overflow float32 (e.g. a finite loss with inf
    gradients), naming the arguments to change. Bounds, from Cauchy-Schwarz (-inf bias entries are masks):

        |z| / tau        <= (max_i |h_i| * max_v |w_v| + max |b|) / tau            (per model, <= LOGIT_LIMIT)
        |dKL / d(z/tau)| <= G = 2 (|z_s| + |z_t|) / tau + 1, times the largest per-token weight and ``scale``
        loss <= N G,   |grad h| <= G |w| / tau,   |grad w| <= N G |h| / tau,   |grad b| <= N G / tau

    Costs one read of each head weight and one host sync; skipped with check_finite=False.
    """
    h_s, w_s, b_s = problem.student_hidden, problem.student_weight, problem.student_bias
    h_t, w_t, b_t = problem.teacher_hidden, problem.teacher_weight, problem.teacher_bias
    rw, fw = problem.reverse_weight, problem.forward_weight
    temperature, n_tokens = problem.temperature, problem.n_tokens

    def norm_max(t: Tensor) -> Tensor:  # row norms in the tensor's dtype (float32 accumulation), no copy
        if not t.numel():
            return t.new_zeros((), dtype=torch.float32)
        return torch.linalg.vector_norm(t.detach(), dim=-1).max().float()

    def bias_max(b: Tensor | None) -> Tensor:
        if b is None:
            return h_s.new_zeros((), dtype=torch.float32)
        return b.detach().masked_fill(torch.isneginf(b), 0.0).abs().max().float()

    values = torch.stack([norm_max(h_s), norm_max(w_s), bias_max(b_s), norm_max(h_t), norm_max(w_t), bias_max(b_t),
                          torch.maximum(rw.max(), fw.max()).float()]).tolist()  # the one sync
    logits = []
    for role, (h_max, w_max, b_max), h, w in (("student", values[0:3], h_s, w_s), ("teacher", values[3:6], h_t, w_t)):
        if not math.isfinite(w_max) and not bool(torch.isfinite(w).all()):
            raise ValueError(f"{role}_weight has non-finite values (NaN/inf); pass check_finite=False to let them "
                             "propagate into the loss instead")
        logit = (h_max * w_max + b_max) / temperature  # inf when a norm overflows float32: rejected below
        if not logit <= LOGIT_LIMIT:
            raise ValueError(f"the {role}'s logits / temperature can reach {logit:.3g} (|{role}_hidden| "
                             f"{h_max:.3g} x |{role}_weight row| {w_max:.3g} + |{role}_bias| {b_max:.3g}, "
                             f"over temperature={temperature:g}); they must stay within {LOGIT_LIMIT:g}, beyond "
                             "which float32 logits and their gradients are not finite or not meaningful: rescale "
                             f"{role}_hidden / {role}_weight or raise the temperature")
        logits.append((logit, h_max, w_max))
    (z_s, h_max, w_max), (z_t, _, _) = logits
    weight_scale = values[6] * scale
    per_token = (2.0 * (z_s + z_t) + 1.0) * weight_scale
    bound = max(n_tokens * per_token, per_token * w_max / temperature, n_tokens * per_token * max(h_max, 1.0)
                / temperature)
    if not bound <= OVERFLOW_LIMIT:
        raise ValueError(f"the loss or the student's gradients can reach {bound:.3g} > {OVERFLOW_LIMIT:g} (float32 "
                         f"overflows): largest reverse_weight/forward_weight (over the normalizer) {weight_scale:.3g}, "
                         f"{n_tokens} tokens, |student_hidden| {h_max:.3g}, |student_weight row| {w_max:.3g}, "
                         f"temperature={temperature:g}; lower the weights or raise the normalizer")


def _check_result(loss: Tensor, stats: dict[str, Tensor] | None, problem: KLProblem, args: _Checked,
                  check_finite: bool) -> None:
    """Report an infinite per-token KL (a -inf bias in one head only) with a warning; with ``check_finite``, turn
    a NaN/inf that no mask explains (non-finite or overflowing head weights) into an error naming the argument."""
    rw, fw = problem.reverse_weight, problem.forward_weight
    if args.masked_vocab and stats is not None and problem.jsd_beta is None:
        counts = {direction: int(((stats[key] == math.inf) & (weight > 0)).sum())
                  for direction, key, weight in (("reverse KL(p_s||p_t)", "reverse_kl", rw),
                                                 ("forward KL(p_t||p_s)", "forward_kl", fw))}
        found = [f"{direction} on {count} token(s)" for direction, count in counts.items() if count]
        if found:
            warnings.warn(f"fused_linear_kl: the loss is +inf: {', '.join(found)} is infinite because a -inf bias "
                          "masks vocabulary entries in one model that the other gives probability > 0 (reverse: "
                          "teacher_bias masks what the student predicts; forward: student_bias masks what the "
                          "teacher predicts). Those tokens' reverse-KL gradients are 0; forward-KL gradients stay "
                          "p_s - p_t.", RuntimeWarning, stacklevel=3)
            if not bool(torch.isnan(loss).any()):
                return
    if not check_finite or bool(torch.isfinite(loss).all()):
        return
    if args.masked_vocab and bool(torch.isnan(loss).any()):
        raise RuntimeError(f"fused_linear_kl: backend {args.backend!r} returned NaN for a vocabulary masked with -inf "
                           "biases, which must give the loss over the unmasked entries (gopd_fast.ops states the "
                           "rules); use backend='chunked' until this backend implements them")
    for name, t in (("student_weight", problem.student_weight), ("teacher_weight", problem.teacher_weight)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} has non-finite values (NaN/inf); pass check_finite=False to let them "
                             "propagate into the loss instead")
    raise ValueError("the loss is not finite although every input is (float32 overflow): rescale the hidden "
                     "states / head weights, lower reverse_weight/forward_weight or raise the normalizer")


def _connected_zero(*tensors: Tensor | None) -> Tensor:
    """0.0 that depends on every given tensor (so each gets an all-zero gradient), even if they hold NaN."""
    parts = [t.reshape(-1)[:0].sum() for t in tensors if t is not None]
    return sum(parts[1:], parts[0])


@dataclass(frozen=True)
class _Tokens:
    """The tokens with a nonzero loss weight: the compaction applied before any vocabulary work, and its inverse."""

    active: Tensor  # [N] bool
    index: Tensor  # [n_active] int64 positions of the active tokens
    lead_shape: tuple[int, ...]  # the hidden states' leading dims (N = their product)

    @staticmethod
    def of(reverse_weight: Tensor, forward_weight: Tensor, lead_shape: tuple[int, ...]) -> _Tokens:
        active = (reverse_weight != 0) | (forward_weight != 0)
        return _Tokens(active, active.nonzero().squeeze(1), lead_shape)

    @property
    def n_tokens(self) -> int:
        return self.active.shape[0]

    @property
    def n_active(self) -> int:
        return self.index.shape[0]

    def take(self, t: Tensor) -> Tensor:
        """The active rows of a [N, ...] tensor (no copy when every token is active)."""
        return t if self.n_active == self.n_tokens else t.index_select(0, self.index)

    def scatter(self, values: Tensor) -> Tensor:
        """[n_active] values back at their tokens, 0 elsewhere, shaped like the leading dims."""
        if self.n_active != self.n_tokens:
            values = values.new_zeros(self.n_tokens).index_copy(0, self.index, values)
        return values.reshape(self.lead_shape)


def _make_stats(stats: dict[str, Tensor] | None, tokens: _Tokens, dtype: torch.dtype, with_targets: bool) -> KLStats:
    def full(key: str) -> Tensor:
        if stats is None:
            return torch.zeros(tokens.lead_shape, dtype=dtype, device=tokens.active.device)
        return tokens.scatter(stats[key].detach())

    return KLStats(
        reverse_kl=full("reverse_kl"),
        forward_kl=full("forward_kl"),
        student_entropy=full("student_entropy"),
        token_mask=tokens.active.reshape(tokens.lead_shape),
        student_logprob=full("student_logprob") if with_targets else None,
        teacher_logprob=full("teacher_logprob") if with_targets else None,
    )
