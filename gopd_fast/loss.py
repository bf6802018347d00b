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
from numbers import Real

import torch
from torch import Tensor

from gopd_fast.ops.chunked import fused_linear_kl_chunked
from gopd_fast.ops.naive import accumulation_dtype, fused_linear_kl_naive

BACKENDS = ("auto", "naive", "chunked", "triton")
REDUCTIONS = ("mean", "sum", "none")
BACKEND_ENV = "GOPD_BACKEND"

__all__ = ["BACKENDS", "BACKEND_ENV", "REDUCTIONS", "KLStats", "fused_linear_kl", "resolve_backend"]


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
        temperature: > 0; both models' logits are divided by it.
        student_bias / teacher_bias: optional [V] / [Vt] lm_head biases.
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
        check_finite: raise on non-finite hidden states of weighted tokens. False skips that check (and its host
            sync on GPU): NaN/inf then propagate into the loss, never into a finite wrong value.

    Returns:
        The loss (float32, float64 for float64 inputs), and with ``return_stats`` a ``(loss, KLStats)`` tuple.
        With a scalar reduction the backend computes the gradients during the forward pass (no logit recompute);
        that scalar supports a single backward.
    """
    args = _validate(
        student_hidden, student_weight, teacher_hidden, teacher_weight, reverse_weight, forward_weight, jsd_beta,
        temperature, student_bias, teacher_bias, target_ids, reduction, normalizer, backend, truncate_teacher_vocab,
        chunk_size,
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

    if n_active == 0:  # all masked: an exact 0 that still reaches every student input with zero gradients
        loss_active = None
        stats_active = None
        zero = _connected_zero(student_hidden, student_weight, student_bias).to(out_dtype)
    else:
        # Eager gradients only pay off when a backward will follow (not under no_grad, e.g. evaluation).
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias))
        run = _backend_fn(args.backend, chunk_size)
        loss_active, stats_active = run(
            h_s, student_weight, h_t, w_t, student_bias, b_t, rw, fw,
            jsd_beta=args.jsd_beta, temperature=float(temperature), target_ids=targets,
            grad_scale=grad_scale if needs_grad else None, return_stats=return_stats,
        )
        if grad_scale is not None and not needs_grad:
            loss_active = loss_active.sum() * grad_scale

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


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name for ``backend`` ("auto" honours GOPD_BACKEND, then the device)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
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


def _check_number(name: str, value: object) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _token_weight(name: str, value: object, lead_shape: tuple[int, ...], n_tokens: int, device,
                  dtype: torch.dtype) -> Tensor:
    if not isinstance(value, Tensor):
        number = _check_number(name, value)
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


def _validate(student_hidden, student_weight, teacher_hidden, teacher_weight, reverse_weight, forward_weight,
              jsd_beta, temperature, student_bias, teacher_bias, target_ids, reduction, normalizer, backend,
              truncate_teacher_vocab, chunk_size) -> _Checked:
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

    if jsd_beta is not None:
        jsd_beta = _check_number("jsd_beta", jsd_beta)
        if not 0.0 <= jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta}")
        if forward_weight is not None:
            raise ValueError("forward_weight is not used with jsd_beta; pass the per-token weights as reverse_weight")
    temperature = _check_number("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if normalizer is not None:
        if reduction != "mean":
            raise ValueError(f"normalizer is only used with reduction='mean', got reduction={reduction!r}")
        if _check_number("normalizer", normalizer) <= 0:
            raise ValueError(f"normalizer must be > 0, got {float(normalizer)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if target_ids is not None:
        _check_tensor("target_ids", target_ids)
        if target_ids.dtype.is_floating_point or target_ids.dtype.is_complex or target_ids.dtype == torch.bool:
            raise ValueError(f"target_ids must be an integer tensor (int64), got {target_ids.dtype}")
        if tuple(target_ids.shape) not in (lead_shape, (n_tokens,)):
            raise ValueError(f"target_ids must have shape {list(lead_shape)} (or [{n_tokens}]), "
                             f"got {list(target_ids.shape)}")
    concrete = _choose_backend(backend, device, h_s.dtype)

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
    return _Checked(lead_shape, n_tokens, vocab, rw, fw, jsd_beta, reduction, concrete)


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------
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
