"""Backends of ``gopd_fast.fused_linear_kl``.

Every backend (``naive`` and ``chunked`` here, ``triton`` in ``gopd_fast.kernels``) exposes one function with
this exact contract; ``gopd_fast.loss`` validates arguments, compacts zero-weight tokens away, slices a padded
teacher vocabulary, then calls it:

    def fused_linear_kl_<backend>(
        student_hidden: Tensor,        # [N, Ds] float (bf16/fp16/fp32/fp64), contiguous, only tokens with loss
        student_weight: Tensor,        # [V, Ds]
        teacher_hidden: Tensor,        # [N, Dt]
        teacher_weight: Tensor,        # [V, Dt]  (already the first V rows when the teacher vocab was padded)
        student_bias: Tensor | None,   # [V]
        teacher_bias: Tensor | None,   # [V]
        reverse_weight: Tensor,        # [N] float32 >= 0
        forward_weight: Tensor,        # [N] float32 >= 0 (ignored when jsd_beta is set)
        *,
        jsd_beta: float | None,        # None: loss_i = rw_i*KL(p_s||p_t) + fw_i*KL(p_t||p_s); else rw_i*JSD_beta
        temperature: float,            # logits are z / temperature for both models
        target_ids: Tensor | None,     # [N] int64, for the log-prob stats
        grad_scale: float | None,      # see below
        return_stats: bool,
    ) -> tuple[Tensor, dict[str, Tensor] | None]

``grad_scale=None``: returns the per-token loss [N] float32, differentiable w.r.t. student_hidden,
student_weight and student_bias (backward recomputes logit tiles). ``grad_scale=c``: the caller needs only the
scalar ``c * sum_i loss_i``; the backend returns that scalar (float32, 0-dim) and may compute the gradients
eagerly in the forward pass (no recompute; backward multiplies them by the incoming scalar gradient).

Stats (detached, float32, [N]): "reverse_kl", "forward_kl", "student_entropy", and with target_ids
"student_logprob", "teacher_logprob". Accumulation is always float32 (float64 for float64 inputs).
Teacher inputs never receive gradients.

Generalised JSD, the TRL/Liger convention: with M = beta*p_s + (1-beta)*p_t,
    JSD_beta = beta*KL(p_s||M) + (1-beta)*KL(p_t||M), with the endpoints beta=0 -> KL(p_t||p_s) (forward)
    and beta=1 -> KL(p_s||p_t) (reverse).
(Verify this convention against the installed liger_kernel and trl sources before relying on it.)
"""
