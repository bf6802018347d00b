"""``fused_linear_kl``: the distillation loss straight from hidden states, without [N, V] logits.

Per token i, with p_s = softmax((h_s W_s^T + b_s) / tau) and p_t = softmax((h_t W_t^T + b_t) / tau):

    loss_i = reverse_weight[i] * KL(p_s || p_t) + forward_weight[i] * KL(p_t || p_s)
    loss_i = reverse_weight[i] * JSD_beta(p_s, p_t)                        when jsd_beta is given

JSD follows TRL's and Liger's convention (``gopd_fast.ops`` documents it): beta=0 is forward KL, beta=1 is reverse
KL. This module validates the arguments, drops zero-weight tokens before any vocabulary work, picks a backend
(``gopd_fast.ops`` documents their shared contract) and reduces. Tokens dropped this way cost nothing and get
exactly zero loss and zero gradient.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

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
from gopd_fast.ops.chunked import fused_linear_kl_chunked
from gopd_fast.ops.naive import accumulation_dtype, fused_linear_kl_naive

BACKENDS = ("auto", "naive", "chunked", "triton")
REDUCTIONS = ("mean", "sum", "none")
BACKEND_ENV = "GOPD_BACKEND"

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
        student_hidden, student_weight, teacher_hidden, teacher_weight, reverse_weight, forward_weight, jsd_beta,
        temperature, student_bias, teacher_bias, target_ids, reduction, normalizer, backend, truncate_teacher_vocab,
        chunk_size, return_stats, check_finite,
    )
    lead_shape, n_tokens, vocab = args.lead_shape, args.n_tokens, args.vocab
    h_s = student_hidden.reshape(n_tokens, student_hidden.shape[-1])
    h_t = teacher_hidden.detach().reshape(n_tokens, teacher_hidden.shape[-1])
    w_t = teacher_weight.detach()[:vocab]
    b_t = None if teacher_bias is None else teacher_bias.detach()[:vocab]
    rw, fw = args.reverse_weight, args.forward_weight
    out_dtype = accumulation_dtype(student_hidden, teacher_hidden)

    active = (rw != 0) | (fw != 0)
    index = active.nonzero().squeeze(1)
    n_active = index.numel()
    all_active = n_active == n_tokens
    if not all_active:  # drop zero-weight tokens before any vocabulary work
        h_s, h_t, rw, fw = h_s.index_select(0, index), h_t.index_select(0, index), rw[index], fw[index]
    h_s, h_t = h_s.contiguous(), h_t.contiguous()
    targets = None
    if target_ids is not None:
        targets = target_ids.reshape(n_tokens)
        targets = (targets if all_active else targets[index]).long()
        _check_target_range(targets, vocab)
    if check_finite and n_active:
        for name, h in (("student_hidden", h_s), ("teacher_hidden", h_t)):
            if not bool(torch.isfinite(h).all()):
                raise ValueError(f"{name} has non-finite values (NaN/inf) at tokens with a nonzero loss weight; "
                                 "pass check_finite=False to let them propagate into the loss instead")

    denominator = float(normalizer) if normalizer is not None else float(max(n_active, 1))
    grad_scale = None if args.reduction == "none" else (1.0 / denominator if args.reduction == "mean" else 1.0)
    if check_finite and n_active:
        _check_scale(h_s, student_weight, student_bias, h_t, w_t, b_t, args.temperature, rw, fw,
                     1.0 if grad_scale is None else grad_scale, n_active)
    # With a -inf bias a token's KL may be +inf: the per-token KLs are needed to report it (_check_result).
    want_stats = return_stats or (args.masked_vocab and args.jsd_beta is None)

    if n_active == 0:  # all masked: an exact 0 that still reaches every student input with zero gradients
        loss_active = None
        stats_active = None
        zero = _connected_zero(student_hidden, student_weight, student_bias).to(out_dtype)
    else:
        # Eager gradients only pay off when a backward will follow (not under no_grad, e.g. evaluation).
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias))
        run = _backend_fn(args.backend, chunk_size)
        with autocast_off(h_s.device):
            loss_active, stats_active = run(
                h_s, student_weight, h_t, w_t, student_bias, b_t, rw, fw,
                jsd_beta=args.jsd_beta, temperature=args.temperature, target_ids=targets,
                grad_scale=grad_scale if needs_grad else None, return_stats=want_stats,
            )
        if grad_scale is not None and not needs_grad:
            loss_active = loss_active.sum() * grad_scale
        _check_result(loss_active, stats_active, rw, fw, args, (student_weight, teacher_weight), check_finite)

    if args.reduction == "none":
        if loss_active is None:
            loss = torch.zeros(n_tokens, dtype=out_dtype, device=student_hidden.device) + zero
        else:
            loss = _scatter(loss_active, index, n_tokens, all_active)
        loss = loss.reshape(lead_shape)
    else:
        loss = zero if loss_active is None else loss_active

    if not return_stats:
        return loss
    return loss, _make_stats(stats_active, index, n_tokens, all_active, active, lead_shape, out_dtype,
                             target_ids is not None, student_hidden.device)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------
_warned_triton_fallback = False


def check_backend(backend: object) -> str:
    """``backend`` as given to ``fused_linear_kl`` and the classes built on it (checked at their construction)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name for ``backend`` ("auto" honours GOPD_BACKEND, then the device)."""
    if check_backend(backend) != "auto":
        return backend
    env = os.environ.get(BACKEND_ENV, "").strip()
    if env:
        if env not in BACKENDS:
            raise ValueError(f"environment variable {BACKEND_ENV} must be one of {BACKENDS}, got {env!r}")
        if env != "auto":
            return env
    return "triton" if device.type == "cuda" else "chunked"


def _backend_fn(name: str, chunk_size: int | None) -> Callable:
    if name == "naive":
        return fused_linear_kl_naive
    if name == "chunked":
        return lambda *a, **kw: fused_linear_kl_chunked(*a, chunk_size=chunk_size, **kw)
    return _import_triton()


def _import_triton() -> Callable:
    try:
        from gopd_fast.kernels.fused_linear_kl import fused_linear_kl_triton
    except ImportError as err:
        raise ImportError(f"backend='triton' needs the triton package and gopd_fast.kernels.fused_linear_kl "
                          f"({err}); use backend='chunked' on machines without them") from err
    return fused_linear_kl_triton


def _triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _choose_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    global _warned_triton_fallback
    explicit = backend == "triton" or (backend == "auto" and os.environ.get(BACKEND_ENV, "").strip() == "triton")
    name = resolve_backend(backend, device)
    if name != "triton":
        return name
    if dtype == torch.float64:  # the kernels are bf16/fp16/fp32 only; float64 is for references and tests
        if explicit:
            raise ValueError("backend='triton' supports bfloat16, float16 and float32 inputs, got float64; "
                             "use backend='chunked' or 'naive' for float64")
        return "chunked"
    if not _triton_usable(device):
        raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 to "
                         "run the Triton interpreter on CPU (slow, for tests), or use backend='chunked'")
    if explicit:
        _import_triton()  # fail now, with the install hint, rather than mid-call
        return name
    try:  # "auto" on CUDA: prefer triton, but a missing triton is no reason to fail
        _import_triton()
    except ImportError as err:
        if not _warned_triton_fallback:
            warnings.warn(f"fused_linear_kl: triton backend unavailable ({err}); using 'chunked'", stacklevel=3)
            _warned_triton_fallback = True
        return "chunked"
    return name


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
    jsd_beta: float | None  # None or strictly inside (0, 1): the endpoints are mapped to plain KL
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


def _validate(student_hidden, student_weight, teacher_hidden, teacher_weight, reverse_weight, forward_weight,
              jsd_beta, temperature, student_bias, teacher_bias, target_ids, reduction, normalizer, backend,
              truncate_teacher_vocab, chunk_size, return_stats, check_finite) -> _Checked:
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
    concrete = _choose_backend(backend, device, h_s.dtype)
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
    if jsd_beta == 0.0:  # the convention's endpoints are plain KL, weighted by reverse_weight
        rw, fw, jsd_beta = fw, rw, None
    elif jsd_beta == 1.0:
        jsd_beta = None
    return _Checked(lead_shape, n_tokens, vocab, rw, fw, jsd_beta, reduction, concrete, temperature, masked_vocab)


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------
# |logit| / temperature above this is rejected: float32 no longer resolves logit differences of 1 beyond ~1.7e7,
# and the gradients (logit-sized factors times hidden states or weights) head for float32 overflow.
LOGIT_LIMIT = 1e8
# Bound on the loss and on every gradient entry (float32 overflows at 3.4e38; the bound leaves room for sums).
OVERFLOW_LIMIT = 1e30


def _check_scale(h_s: Tensor, w_s: Tensor, b_s: Tensor | None, h_t: Tensor, w_t: Tensor, b_t: Tensor | None,
                 temperature: float, rw: Tensor, fw: Tensor, scale: float, n_tokens: int) -> None:
    """Reject inputs whose logits, loss or gradients would overflow float32 (e.g. a finite loss with inf
    gradients), naming the arguments to change. Bounds, from Cauchy-Schwarz (-inf bias entries are masks):

        |z| / tau        <= (max_i |h_i| * max_v |w_v| + max |b|) / tau            (per model, <= LOGIT_LIMIT)
        |dKL / d(z/tau)| <= G = 2 (|z_s| + |z_t|) / tau + 1, times the largest per-token weight and ``scale``
        loss <= N G,   |grad h| <= G |w| / tau,   |grad w| <= N G |h| / tau,   |grad b| <= N G / tau

    Costs one read of each head weight and one host sync; skipped with check_finite=False.
    """
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


def _check_result(loss: Tensor, stats: dict[str, Tensor] | None, rw: Tensor, fw: Tensor, args: _Checked,
                  heads: tuple[Tensor, Tensor], check_finite: bool) -> None:
    """Report an infinite per-token KL (a -inf bias in one head only) with a warning; with ``check_finite``, turn
    a NaN/inf that no mask explains (non-finite or overflowing head weights) into an error naming the argument."""
    if args.masked_vocab and stats is not None and args.jsd_beta is None:
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
    for name, t in zip(("student_weight", "teacher_weight"), heads):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} has non-finite values (NaN/inf); pass check_finite=False to let them "
                             "propagate into the loss instead")
    raise ValueError("the loss is not finite although every input is (float32 overflow): rescale the hidden "
                     "states / head weights, lower reverse_weight/forward_weight or raise the normalizer")


def _connected_zero(*tensors: Tensor | None) -> Tensor:
    """0.0 that depends on every given tensor (so each gets an all-zero gradient), even if they hold NaN."""
    parts = [t.reshape(-1)[:0].sum() for t in tensors if t is not None]
    return sum(parts[1:], parts[0])


def _scatter(values: Tensor, index: Tensor, n_tokens: int, all_active: bool) -> Tensor:
    if all_active:
        return values
    return values.new_zeros(n_tokens).index_copy(0, index, values)


def _make_stats(stats: dict[str, Tensor] | None, index: Tensor, n_tokens: int, all_active: bool, active: Tensor,
                lead_shape: tuple[int, ...], dtype: torch.dtype, with_targets: bool, device) -> KLStats:
    def full(key: str) -> Tensor:
        if stats is None:
            return torch.zeros(lead_shape, dtype=dtype, device=device)
        return _scatter(stats[key].detach(), index, n_tokens, all_active).reshape(lead_shape)

    return KLStats(
        reverse_kl=full("reverse_kl"),
        forward_kl=full("forward_kl"),
        student_entropy=full("student_entropy"),
        token_mask=active.reshape(lead_shape),
        student_logprob=full("student_logprob") if with_targets else None,
        teacher_logprob=full("teacher_logprob") if with_targets else None,
    )
