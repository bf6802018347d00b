"""The chunked backend: pure PyTorch, tiles the vocabulary, never holds an [N, V] tensor. The CPU default.

Both logit matrices are produced one [N, chunk] tile at a time (``z = (h / tau) W[lo:hi]^T + b[lo:hi] / tau``) and
folded into per-token running statistics with the online recurrences of docs/algorithm.md §6.2: running maxima
m_s, m_t, sums l_s, l_t and the accumulators A = sum e^(z_s - m_s)(z_s - z_t), B = sum e^(z_t - m_t)(z_t - z_s),
rescaled whenever a maximum grows. At the end lse = m + log l, RKL = A/l_s - lse_s + lse_t, FKL = B/l_t - lse_t +
lse_s. The gradient w.r.t. the student logits,
    rw * p_s * ((log p_s - log p_t) - RKL) + fw * (p_s - p_t)       (JSD: rw (1-beta) p_s (log(p_s/M) - KL(p_s||M)))
needs those per-token finals, so it is produced by a second sweep that recomputes the tiles. JSD needs both lse
before it can form M, hence one extra sweep for its value.

Two autograd Functions share the sweeps:
- ``_ChunkedKLScalar`` (``grad_scale=c`` and some gradient in ``needs_grad``): forward runs every sweep including
  the gradient one and keeps the gradients (Liger-style); backward only multiplies them by the incoming scalar.
  Because the gradient sweep follows immediately, the tiles of the value sweep can be kept instead of recomputed:
  tokens are processed in blocks whose [block, V] logits of both models fit ``cache_bytes`` (128 MiB by default,
  ~110 tokens at V=151936), so every logit is computed once, as with materialised logits, at bounded memory.
  Several blocks add their weight gradients into one buffer; with ``cache_bytes=0`` (or fewer than 64 tokens
  fitting) the gradient sweep recomputes the tiles instead.
- ``_ChunkedKLPerToken`` (``grad_scale=None``, or no gradient needed: then its sum is scaled): forward runs the
  value sweeps and saves lse_s, lse_t, RKL (and KL(p_s||M) for JSD); backward recomputes the tiles in its gradient
  sweep with the per-token upstream gradient.

Memory: O(N x chunk) temporaries, O(N) statistics, O(N x D) for the hidden-state gradient, plus at most
``cache_bytes`` of cached tiles on the scalar path; never an [N, V] tensor. Accumulation in float32 (float64 for
float64 inputs). Contract: ``gopd_fast.ops.problem.KLProblem``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from gopd_fast.ops.autocast import autocast_off
from gopd_fast.ops.problem import KLProblem

# Elements per [N, chunk] tile: 4 Mi fp32 = 16 MiB, so the handful of live temporaries stays near 100 MiB.
_TILE_ELEMENTS = 1 << 22
_MIN_CHUNK = 256
_MAX_CHUNK = 8192
# Logit cache of the scalar (grad_scale) path: both models' [block, V] logits. 128 MiB holds ~110 tokens at
# V=151936 in fp32; blocks under _MIN_CACHE_BLOCK tokens are not worth it (skinny weight-gradient matmuls).
DEFAULT_CACHE_BYTES = 128 << 20
_MIN_CACHE_BLOCK = 64


def default_chunk_size(n_tokens: int, vocab_size: int) -> int:
    """A vocabulary tile that keeps each [n_tokens, chunk] temporary near 16 MiB (fp32)."""
    chunk = max(_MIN_CHUNK, min(_MAX_CHUNK, _TILE_ELEMENTS // max(n_tokens, 1)))
    return max(1, min(vocab_size, chunk))


@dataclass
class _Operands:
    """Inputs prepared once per call: hidden states and biases pre-divided by the temperature, in acc dtype."""

    h_s: Tensor  # [N, Ds] acc dtype, = student_hidden / tau
    w_s: Tensor  # [V, Ds] original dtype
    b_s: Tensor | None  # [V] acc dtype, = student_bias / tau
    h_t: Tensor
    w_t: Tensor
    b_t: Tensor | None
    chunk: int
    # Some bias has a -inf entry: the sweeps then apply the masking rules (gopd_fast.ops); else they skip them.
    masked: bool = False
    # None: every sweep recomputes its tiles. A list: the first sweep appends its (z_s, z_t) tiles, later sweeps
    # read them back instead of recomputing (only the last sweep, the gradient one, may modify them in place).
    cache: list[tuple[Tensor, Tensor]] | None = None

    @property
    def vocab(self) -> int:
        return self.w_s.shape[0]

    def tiles(self):
        for i, lo in enumerate(range(0, self.vocab, self.chunk)):
            yield i, lo, min(lo + self.chunk, self.vocab)

    def student_weight_tile(self, lo: int, hi: int) -> Tensor:
        return self.w_s[lo:hi].to(self.h_s.dtype)

    def logits(self, i: int, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Student and teacher logit tiles [N, hi-lo] (already / tau)."""
        if self.cache is not None and i < len(self.cache):
            return self.cache[i]
        z_s = _affine(self.h_s, self.student_weight_tile(lo, hi), self.b_s, lo, hi)
        z_t = _affine(self.h_t, self.w_t[lo:hi].to(self.h_t.dtype), self.b_t, lo, hi)
        if self.cache is not None:
            self.cache.append((z_s, z_t))
        return z_s, z_t

    def rows(self, start: int, stop: int, cached: bool) -> _Operands:
        """The same problem restricted to tokens [start, stop), optionally with a fresh logit cache."""
        return replace(self, h_s=self.h_s[start:stop], h_t=self.h_t[start:stop], cache=[] if cached else None)


def _affine(h: Tensor, w: Tensor, b: Tensor | None, lo: int, hi: int) -> Tensor:
    if b is None:
        return h @ w.T
    return torch.addmm(b[lo:hi], h, w.T)


@dataclass(frozen=True)
class ChunkedOptions:
    """The chunked backend's own options (``fused_linear_kl_chunked`` documents them)."""

    chunk_size: int | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES


@dataclass(frozen=True)
class _Setup:
    """What a sweep needs of the problem besides its tensors (kept on the autograd ctx; tensors are saved)."""

    temperature: float
    jsd_beta: float | None
    masked: bool
    dtype: torch.dtype
    uses_forward_kl: bool
    chunk: int | None

    @staticmethod
    def of(problem: KLProblem, chunk: int | None) -> _Setup:
        return _Setup(problem.temperature, problem.jsd_beta, problem.masked_vocab, problem.accumulation_dtype,
                      problem.uses_forward_kl, chunk)


def _prepare(setup: _Setup, h_s: Tensor, w_s: Tensor, b_s: Tensor | None, h_t: Tensor, w_t: Tensor,
             b_t: Tensor | None) -> _Operands:
    inv_tau = 1.0 / setup.temperature

    def scaled(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().to(setup.dtype) * inv_tau

    return _Operands(
        h_s=scaled(h_s), w_s=w_s.detach(), b_s=scaled(b_s), h_t=scaled(h_t), w_t=w_t.detach(), b_t=scaled(b_t),
        chunk=setup.chunk or default_chunk_size(h_s.shape[0], w_s.shape[0]), masked=setup.masked,
    )


# ----------------------------------------------------------------------------------------------------------------
# Sweeps over the vocabulary
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Stats:
    lse_s: Tensor
    lse_t: Tensor
    reverse_kl: Tensor
    forward_kl: Tensor | None
    student_entropy: Tensor | None


def _masks(z_s: Tensor, z_t: Tensor) -> tuple[Tensor, Tensor]:
    """Entries not masked by a -inf bias, per model (``gopd_fast.ops``: the -inf semantics)."""
    return z_s > -math.inf, z_t > -math.inf


def _safe_max(m: Tensor) -> Tensor:
    """A running maximum usable as an exponent shift: 0 where every entry so far is -inf (masked)."""
    return torch.where(m > -math.inf, m, 0.0)


def _stats_sweep(ops: _Operands, need_forward_kl: bool, need_entropy: bool) -> _Stats:
    """One sweep: lse of both models, RKL, and optionally FKL and the student entropy (online recurrences).

    -inf logits (masked entries) add nothing; an entry one model masks and the other does not makes that
    direction's KL +inf (0 * log 0 = 0 everywhere else).
    """
    def zeros() -> Tensor:
        return ops.h_s.new_zeros(ops.h_s.shape[0])

    m_s, m_t = zeros() - math.inf, zeros() - math.inf
    l_s, l_t, acc_a = zeros(), zeros(), zeros()
    acc_b = zeros() if need_forward_kl else None
    acc_e = zeros() if need_entropy else None
    for i, lo, hi in ops.tiles():
        z_s, z_t = ops.logits(i, lo, hi)  # read-only here: they may be cached for later sweeps
        new_m_s = torch.maximum(m_s, z_s.amax(1))
        new_m_t = torch.maximum(m_t, z_t.amax(1))
        shift_s, shift_t = _safe_max(new_m_s), _safe_max(new_m_t)
        rescale_s, rescale_t = torch.exp(m_s - shift_s), torch.exp(m_t - shift_t)
        m_s, m_t = new_m_s, new_m_t
        e_s = torch.exp(z_s - shift_s[:, None])
        e_t = torch.exp(z_t - shift_t[:, None])
        l_s = l_s * rescale_s + e_s.sum(1)
        l_t = l_t * rescale_t + e_t.sum(1)
        if not ops.masked:
            diff = z_s - z_t
            term_a, term_b = e_s * diff, None if acc_b is None else -(e_t * diff)
            term_e = None if acc_e is None else e_s * z_s
        else:
            ok_s, ok_t = _masks(z_s, z_t)
            diff = torch.where(ok_s & ok_t, z_s - z_t, 0.0)
            # an entry only the teacher masks makes RKL +inf (only the student: FKL); masked in both: nothing
            term_a = torch.where(ok_s & ~ok_t, math.inf, e_s * diff)
            term_b = None if acc_b is None else torch.where(ok_t & ~ok_s, math.inf, -(e_t * diff))
            term_e = None if acc_e is None else torch.where(ok_s, e_s * z_s, 0.0)
        acc_a = acc_a * rescale_s + term_a.sum(1)
        if acc_b is not None:
            acc_b = acc_b * rescale_t + term_b.sum(1)
        if acc_e is not None:
            acc_e = acc_e * rescale_s + term_e.sum(1)
    lse_s, lse_t = m_s + l_s.log(), m_t + l_t.log()
    return _Stats(
        lse_s=lse_s,
        lse_t=lse_t,
        reverse_kl=acc_a / l_s - lse_s + lse_t,
        forward_kl=None if acc_b is None else acc_b / l_t - lse_t + lse_s,
        student_entropy=None if acc_e is None else lse_s - acc_e / l_s,
    )


def _log_mixture(logp_s: Tensor, logp_t: Tensor, beta: float) -> Tensor:
    """log M with M = beta p_t + (1 - beta) p_s (TRL/Liger convention), computed in log space (-inf only where
    both models mask the entry)."""
    return torch.logaddexp(logp_t + math.log(beta), logp_s + math.log1p(-beta))


def _jsd_sweep(ops: _Operands, st: _Stats, beta: float) -> tuple[Tensor, Tensor]:
    """Second sweep for JSD (needs both lse): per-token JSD_beta and KL(p_s || M) (the latter for the gradient)."""
    jsd, kl_s_m = ops.h_s.new_zeros(ops.h_s.shape[0]), ops.h_s.new_zeros(ops.h_s.shape[0])
    for i, lo, hi in ops.tiles():
        z_s, z_t = ops.logits(i, lo, hi)
        logp_s, logp_t = z_s - st.lse_s[:, None], z_t - st.lse_t[:, None]
        log_m = _log_mixture(logp_s, logp_t, beta)
        term_s, term_t = logp_s.exp() * (logp_s - log_m), logp_t.exp() * (logp_t - log_m)
        if ops.masked:  # 0 * log 0 = 0 where a model masks the entry
            ok_s, ok_t = _masks(z_s, z_t)
            term_s, term_t = torch.where(ok_s, term_s, 0.0), torch.where(ok_t, term_t, 0.0)
        term_s, term_t = term_s.sum(1), term_t.sum(1)
        kl_s_m += term_s
        jsd += beta * term_t + (1.0 - beta) * term_s
    return jsd, kl_s_m


@dataclass
class _Grads:
    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None


def _grad_buffers(ops: _Operands, need: tuple[bool, bool, bool], out_dtypes: tuple) -> _Grads:
    """Zeroed gradient buffers: hidden in acc dtype (accumulated over tiles), weight/bias in the output dtype."""
    need_h, need_w, need_b = need
    device = ops.h_s.device
    return _Grads(
        hidden=torch.zeros_like(ops.h_s) if need_h else None,
        weight=torch.zeros(ops.w_s.shape, dtype=out_dtypes[1], device=device) if need_w else None,
        bias=torch.zeros(ops.vocab, dtype=out_dtypes[2], device=device) if need_b else None,
    )


def _grad_sweep(ops: _Operands, st: _Stats, coef_r: Tensor, coef_f: Tensor | None, jsd_beta: float | None,
                kl_s_m: Tensor | None, out: _Grads, accumulate: bool) -> None:
    """Gradient sweep: get each tile (recomputed or cached), form dLoss/dz_s, push it through the linear layer.

    coef_r[i] / coef_f[i] are the per-token multipliers of the reverse / forward (or JSD) terms, upstream
    gradient included. ``out.hidden`` holds the rows of ``ops`` (added to); ``out.weight`` / ``out.bias`` are
    overwritten tile by tile, or added to when ``accumulate`` (token blocks; then they are in acc dtype).
    """
    dtype = ops.h_s.dtype
    c_r = coef_r.to(dtype)[:, None]
    c_f = None if coef_f is None else coef_f.to(dtype)[:, None]
    rkl = st.reverse_kl[:, None]
    if jsd_beta is None and ops.masked:
        # a token whose RKL is +inf (the teacher masks what the student predicts) has no usable reverse-KL
        # gradient: 0 (JSD stays finite and needs no such rule)
        finite = torch.isfinite(rkl)
        c_r, rkl = torch.where(finite, c_r, 0.0), torch.where(finite, rkl, 0.0)
    for i, lo, hi in ops.tiles():
        z_s, z_t = ops.logits(i, lo, hi)  # last reader: free to work in place
        ok_s, ok_t = _masks(z_s, z_t) if ops.masked else (None, None)
        logp_s, logp_t = z_s.sub_(st.lse_s[:, None]), z_t.sub_(st.lse_t[:, None])
        p_s = logp_s.exp()
        if jsd_beta is not None:
            # (1 - beta) p_s (log p_s - log M - KL(p_s||M)), times rw * upstream; 0 where the student masks
            g = logp_s - _log_mixture(logp_s, logp_t, jsd_beta)
            g.sub_(kl_s_m[:, None]).mul_(c_r * (1.0 - jsd_beta)).mul_(p_s)
            if ops.masked:
                g = torch.where(ok_s, g, 0.0)
        else:
            p_t = logp_t.exp() if c_f is not None else None
            # rw p_s ((log p_s - log p_t) - RKL) + fw (p_s - p_t); the reverse part is 0 wherever p_s = 0
            g = logp_t.neg_().add_(logp_s).sub_(rkl).mul_(c_r).mul_(p_s)
            if ops.masked:
                g = torch.where(ok_s & ok_t, g, 0.0)
            if c_f is not None:
                g.addcmul_(p_s - p_t, c_f)
        if ops.cache is not None:
            ops.cache[i] = None  # release the tile as soon as it is used
        if out.hidden is not None:
            out.hidden.addmm_(g, ops.student_weight_tile(lo, hi))
        if out.weight is not None:  # h_s is h / tau: the 1/tau chain factor is already in
            if accumulate:
                out.weight[lo:hi].addmm_(g.T, ops.h_s)
            else:
                out.weight[lo:hi] = g.T @ ops.h_s
        if out.bias is not None:
            if accumulate:
                out.bias[lo:hi] += g.sum(0)
            else:
                out.bias[lo:hi] = g.sum(0)


def _finish_grads(grads: _Grads, temperature: float, hidden_dtype: torch.dtype) -> _Grads:
    """Apply the remaining 1/tau chain factors (grad_h: z = (h/tau) W^T; grad_b: z = ... + b/tau)."""
    inv_tau = 1.0 / temperature
    if grads.hidden is not None:
        grads.hidden = (grads.hidden * inv_tau).to(hidden_dtype)
    if grads.bias is not None:
        grads.bias = grads.bias * inv_tau
    return grads


# ----------------------------------------------------------------------------------------------------------------
# Forward helpers shared by both Functions
# ----------------------------------------------------------------------------------------------------------------
def _values(ops: _Operands, setup: _Setup, reverse_weight: Tensor, forward_weight: Tensor,
            return_stats: bool) -> tuple[Tensor, _Stats, Tensor | None]:
    """Per-token loss [N] (acc dtype), the stats, and KL(p_s||M) for JSD (needed by its gradient)."""
    st = _stats_sweep(ops, need_forward_kl=setup.uses_forward_kl or return_stats, need_entropy=return_stats)
    kl_s_m = None
    if setup.jsd_beta is not None:
        jsd, kl_s_m = _jsd_sweep(ops, st, setup.jsd_beta)
        loss = reverse_weight * jsd
    else:  # a zero weight drops its term even where that KL is +inf (a -inf bias in one model)
        loss = torch.where(reverse_weight != 0, reverse_weight * st.reverse_kl, 0.0)
        if setup.uses_forward_kl:
            loss = loss + torch.where(forward_weight != 0, forward_weight * st.forward_kl, 0.0)
    return loss, st, kl_s_m


def _cat_stats(parts: list[_Stats]) -> _Stats:
    if len(parts) == 1:
        return parts[0]
    fields = {}
    for name in ("lse_s", "lse_t", "reverse_kl", "forward_kl", "student_entropy"):
        values = [getattr(p, name) for p in parts]
        fields[name] = None if values[0] is None else torch.cat(values)
    return _Stats(**fields)


def _token_block(n_tokens: int, ops: _Operands, out_dtypes: tuple, cache_bytes: int) -> int | None:
    """Tokens per block whose [block, V] logits of both models fit ``cache_bytes``; None: do not cache.

    Several blocks accumulate the weight gradient across blocks, which needs it in the accumulation dtype, and
    blocks too small would turn that accumulation into memory-bound skinny matmuls.
    """
    per_token = 2 * ops.vocab * ops.h_s.element_size()
    fits = cache_bytes // per_token
    if fits >= n_tokens:
        return n_tokens
    acc = ops.h_s.dtype
    if fits < _MIN_CACHE_BLOCK or any(d is not None and d != acc for d in out_dtypes[1:]):
        return None
    n_blocks = -(-n_tokens // fits)
    return -(-n_tokens // n_blocks)


def _stats_dict(ops: _Operands, st: _Stats, target_ids: Tensor | None) -> dict[str, Tensor]:
    stats = {"reverse_kl": st.reverse_kl, "forward_kl": st.forward_kl, "student_entropy": st.student_entropy}
    if target_ids is not None:
        idx = target_ids
        z_s = (ops.h_s * ops.w_s[idx].to(ops.h_s.dtype)).sum(-1)
        z_t = (ops.h_t * ops.w_t[idx].to(ops.h_t.dtype)).sum(-1)
        if ops.b_s is not None:
            z_s = z_s + ops.b_s[idx]
        if ops.b_t is not None:
            z_t = z_t + ops.b_t[idx]
        stats["student_logprob"] = z_s.to(st.lse_s.dtype) - st.lse_s
        stats["teacher_logprob"] = z_t.to(st.lse_t.dtype) - st.lse_t
    return {k: v.detach() for k, v in stats.items()}


def _out_dtypes(student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None) -> tuple:
    return (student_hidden.dtype, student_weight.dtype, None if student_bias is None else student_bias.dtype)


def _teacher(problem: KLProblem) -> tuple[Tensor, Tensor, Tensor | None]:
    return problem.teacher_hidden, problem.teacher_weight, problem.teacher_bias


class _ChunkedKLScalar(torch.autograd.Function):
    """grad_scale * sum_i loss_i, with the gradients computed in the forward pass.

    Tokens are processed in blocks whose [block, V] logit tiles fit ``cache_bytes``: the value sweeps keep the
    tiles and the gradient sweep reuses them, so each logit is computed once (as with materialised logits) while
    memory stays bounded. When not even ``_MIN_CACHE_BLOCK`` tokens fit, the gradient sweep recomputes the tiles.
    Inputs: the student tensors that get gradients, the problem and the options; outputs: the loss and the stats.
    """

    @staticmethod
    def forward(ctx, student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None,
                problem: KLProblem, options: ChunkedOptions):
        setup = _Setup.of(problem, options.chunk_size)
        ops = _prepare(setup, student_hidden, student_weight, student_bias, *_teacher(problem))
        n_tokens, grad_scale = ops.h_s.shape[0], problem.grad_scale
        rw, fw = problem.reverse_weight, problem.forward_weight
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], student_bias is not None
                and ctx.needs_input_grad[2])
        out_dtypes = _out_dtypes(student_hidden, student_weight, student_bias)
        block = _token_block(n_tokens, ops, out_dtypes, options.cache_bytes) if any(need) else None
        cached = block is not None
        block = block or n_tokens
        multi_block = block < n_tokens
        grads = _grad_buffers(ops, need, out_dtypes) if any(need) else _Grads(None, None, None)
        coef_r = rw * grad_scale
        coef_f = fw * grad_scale if setup.uses_forward_kl else None
        losses, parts = [], []
        for start in range(0, n_tokens, block):
            stop = min(start + block, n_tokens)
            sub = ops.rows(start, stop, cached)
            if cached and options.chunk_size is None:
                sub = replace(sub, chunk=default_chunk_size(stop - start, ops.vocab))
            loss, st, kl_s_m = _values(sub, setup, rw[start:stop], fw[start:stop], problem.return_stats)
            if any(need):
                out = replace(grads, hidden=None if grads.hidden is None else grads.hidden[start:stop])
                _grad_sweep(sub, st, coef_r[start:stop], None if coef_f is None else coef_f[start:stop],
                            setup.jsd_beta, kl_s_m, out, accumulate=multi_block)
            losses.append(loss)
            parts.append(st)
        if any(need):
            grads = _finish_grads(grads, problem.temperature, student_hidden.dtype)
        # saved (not a ctx attribute) so that autograd frees them after a backward without retain_graph, and
        # keeps them for a second backward with it, which accumulates them again (as Liger's loss does)
        present = tuple(g is not None for g in (grads.hidden, grads.weight, grads.bias))
        ctx.save_for_backward(*(g for g in (grads.hidden, grads.weight, grads.bias) if g is not None))
        ctx.present = present
        st = _cat_stats(parts)
        stats = _stats_dict(ops, st, problem.target_ids) if problem.return_stats else {}
        ctx.mark_non_differentiable(*stats.values())
        return (torch.cat(losses).sum() * grad_scale, *stats.values())

    @staticmethod
    def backward(ctx, grad_loss, *_grad_stats):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if here else None for here in ctx.present]

        def scaled(g: Tensor | None) -> Tensor | None:
            if g is None:
                return None
            return g if bool(grad_loss == 1) else g * grad_loss.to(g.dtype)

        grad_h, grad_w, grad_b = (scaled(g) for g in grads)
        return grad_h, grad_w, grad_b, None, None  # nothing for the problem and the options


class _ChunkedKLPerToken(torch.autograd.Function):
    """Per-token loss [N]; backward recomputes the logit tiles from the saved lse_s, lse_t, RKL (KL(p_s||M)).
    Inputs: the student tensors that get gradients, the problem and the options; outputs: the loss and the stats.
    """

    @staticmethod
    def forward(ctx, student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None,
                problem: KLProblem, options: ChunkedOptions):
        setup = _Setup.of(problem, options.chunk_size)
        teacher = _teacher(problem)
        ops = _prepare(setup, student_hidden, student_weight, student_bias, *teacher)
        loss, st, kl_s_m = _values(ops, setup, problem.reverse_weight, problem.forward_weight, problem.return_stats)
        stats = _stats_dict(ops, st, problem.target_ids) if problem.return_stats else {}
        ctx.save_for_backward(student_hidden, student_weight, student_bias, *teacher, problem.reverse_weight,
                              problem.forward_weight, st.lse_s, st.lse_t, st.reverse_kl, kl_s_m)
        ctx.setup = setup
        ctx.mark_non_differentiable(*stats.values())
        return (loss, *stats.values())

    @staticmethod
    def backward(ctx, grad_loss, *_grad_stats):
        (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
         reverse_weight, forward_weight, lse_s, lse_t, reverse_kl, kl_s_m) = ctx.saved_tensors
        setup: _Setup = ctx.setup
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], student_bias is not None
                and ctx.needs_input_grad[2])
        if not any(need):
            return None, None, None, None, None
        # a backward called under autocast must not re-cast the recomputed tiles
        with autocast_off(student_hidden.device):
            ops = _prepare(setup, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                           teacher_bias)
            st = _Stats(lse_s=lse_s, lse_t=lse_t, reverse_kl=reverse_kl, forward_kl=None, student_entropy=None)
            upstream = grad_loss.to(lse_s.dtype)
            coef_f = forward_weight * upstream if setup.uses_forward_kl else None
            grads = _grad_buffers(ops, need, _out_dtypes(student_hidden, student_weight, student_bias))
            _grad_sweep(ops, st, reverse_weight * upstream, coef_f, setup.jsd_beta, kl_s_m, grads,
                        accumulate=False)
            grads = _finish_grads(grads, setup.temperature, student_hidden.dtype)
        return grads.hidden, grads.weight, grads.bias, None, None  # nothing for the problem and the options


def fused_linear_kl_chunked(problem: KLProblem, *, chunk_size: int | None = None,
                            cache_bytes: int = DEFAULT_CACHE_BYTES) -> tuple[Tensor, dict[str, Tensor] | None]:
    """Backend contract: ``KLProblem``.

    ``chunk_size``: the vocabulary tile (default: ~4 Mi logits per tile). ``cache_bytes``: with ``grad_scale``,
    the memory for keeping logit tiles between the value and gradient sweeps (0: always recompute).
    """
    # eager gradients only pay off when a backward will follow (not under no_grad, e.g. evaluation)
    eager = problem.grad_scale is not None and any(problem.needs_grad)
    function = _ChunkedKLScalar if eager else _ChunkedKLPerToken
    loss, *stat_values = function.apply(problem.student_hidden, problem.student_weight, problem.student_bias,
                                        problem, ChunkedOptions(chunk_size, cache_bytes))
    if problem.grad_scale is not None and not eager:
        loss = loss.sum() * problem.grad_scale
    if not problem.return_stats:
        return loss, None
    keys = ["reverse_kl", "forward_kl", "student_entropy"]
    if problem.target_ids is not None:
        keys += ["student_logprob", "teacher_logprob"]
    return loss, dict(zip(keys, stat_values))


