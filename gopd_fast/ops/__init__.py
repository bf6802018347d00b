"""Backends of ``gopd_fast.fused_linear_kl``.

Every backend (``naive`` and ``chunked`` here, ``triton`` in ``gopd_fast.kernels``) exposes one function with
this exact contract; ``gopd_fast.loss`` validates arguments, compacts zero-weight tokens away, slices a padded
teacher vocabulary, detaches the teacher tensors, maps the JSD endpoints to plain KL (see below), then calls it:

    def fused_linear_kl_<backend>(
        student_hidden: Tensor,        # [N, Ds] float (bf16/fp16/fp32/fp64), contiguous, only tokens with loss
        student_weight: Tensor,        # [V, Ds]  same dtype as student_hidden
        teacher_hidden: Tensor,        # [N, Dt]
        teacher_weight: Tensor,        # [V, Dt]  (already the first V rows when the teacher vocab was padded)
        student_bias: Tensor | None,   # [V]
        teacher_bias: Tensor | None,   # [V]
        reverse_weight: Tensor,        # [N] float32 >= 0 (float64 for float64 inputs)
        forward_weight: Tensor,        # [N] like reverse_weight (all zeros when jsd_beta is set)
        *,
        jsd_beta: float | None,        # None: loss_i = rw_i*KL(p_s||p_t) + fw_i*KL(p_t||p_s); else rw_i*JSD_beta
        temperature: float,            # logits are z / temperature for both models
        target_ids: Tensor | None,     # [N] int64 in [0, V), for the log-prob stats
        grad_scale: float | None,      # see below
        return_stats: bool,
    ) -> tuple[Tensor, dict[str, Tensor] | None]

``grad_scale=None``: returns the per-token loss [N], differentiable w.r.t. student_hidden, student_weight and
student_bias (backward recomputes logit tiles). ``grad_scale=c``: the caller needs only the scalar
``c * sum_i loss_i``; the backend returns that scalar (0-dim) and may compute the gradients eagerly in the
forward pass (no recompute; backward multiplies them by the incoming scalar gradient).
The loss is float32, or float64 when student_hidden or teacher_hidden is float64.
N may be 0 only for direct callers; ``gopd_fast.loss`` never calls a backend with N == 0.

Stats (detached, [N], the loss dtype): "reverse_kl", "forward_kl", "student_entropy", and with target_ids
"student_logprob", "teacher_logprob". Accumulation is always float32 (float64 for float64 inputs).
Teacher inputs never receive gradients.

Generalised JSD, the TRL/Liger convention (checked against liger_kernel 0.8.5 ``chunked_loss/jsd_loss.py`` and
``ops/jsd.py``, and trl 1.16.0 ``GKDTrainer.generalized_jsd_loss``): with M = beta*p_t + (1-beta)*p_s,
    JSD_beta = beta*KL(p_t||M) + (1-beta)*KL(p_s||M)          for 0 < beta < 1,
and the endpoints are *defined* separately as beta=0 -> KL(p_t||p_s) (forward) and beta=1 -> KL(p_s||p_t)
(reverse); the interior formula itself tends to 0 at both ends. ``gopd_fast.loss`` maps the endpoints to plain
KL before calling a backend, so a backend only ever sees jsd_beta=None or 0 < jsd_beta < 1.
Its gradient w.r.t. the student logits is (1-beta) * p_s * (log(p_s/M) - KL(p_s||M)).

Masked vocabulary entries (-inf bias, in the student's head, the teacher's, or both), the same in every backend:
the loss is the loss over the unmasked entries, with 0 * log 0 = 0.
- an entry with probability 0 under both models adds nothing to any term and gets zero gradient;
- reverse KL(p_s||p_t): an entry the student gives 0 adds nothing; one the student gives p > 0 and the teacher 0
  makes that token's RKL +inf, and its reverse-KL gradient is 0 (p_s (log p_s - log p_t - RKL) is inf - inf there);
- forward KL(p_t||p_s): symmetric (teacher p > 0, student 0 -> +inf); its gradient stays p_s - p_t (finite);
- JSD with 0 < beta < 1 stays finite (M > 0 wherever either model is);
- a zero loss weight drops its term exactly, even where that KL is +inf (never 0 * inf = NaN).
``gopd_fast.loss`` rejects a model with every entry masked, NaN/+inf biases, and reports infinite KLs with a
warning. The backward of the scalar path (``grad_scale``) keeps its gradients as saved tensors, so a second backward
with ``retain_graph=True`` accumulates them again. Under ``torch.autocast`` ``gopd_fast.loss`` calls the backend with
autocast off and operands already in the autocast dtype (``gopd_fast.ops.autocast``).
"""
