"""Backends of ``gopd_fast.fused_linear_kl`` and the pieces they share.

The contract is one object: ``problem.KLProblem`` (its fields document the inputs, the loss, ``grad_scale`` and
the stats). Every backend is ``fused_linear_kl_<name>(problem, **its_own_options) -> (loss, stats | None)``:
``naive`` and ``chunked`` here, ``triton`` in ``gopd_fast.kernels``. ``gopd_fast.loss`` validates the arguments and
builds the problem (``problem.build_problem``, which also maps the JSD endpoints); ``dispatch`` picks the backend;
``precision.accumulation_dtype`` is the accumulation rule; ``checks`` and ``autocast`` are shared by every entry.

Masked vocabulary entries (-inf bias, in the student's head, the teacher's, or both), the same in every backend:
the loss is the loss over the unmasked entries, with 0 * log 0 = 0.
- an entry with probability 0 under both models adds nothing to any term and gets zero gradient;
- reverse KL(p_s||p_t): an entry the student gives 0 adds nothing; one the student gives p > 0 and the teacher 0
  makes that token's RKL +inf, and its reverse-KL gradient is 0 (p_s (log p_s - log p_t - RKL) is inf - inf there);
- forward KL(p_t||p_s): symmetric (teacher p > 0, student 0 -> +inf); its gradient stays p_s - p_t (finite);
- JSD with 0 < beta < 1 stays finite (M > 0 wherever either model is);
- a zero loss weight drops its term exactly, even where that KL is +inf (never 0 * inf = NaN).
``gopd_fast.loss`` rejects a model with every entry masked, NaN/+inf biases, and reports infinite KLs with a
warning. Under ``torch.autocast`` it calls the backend with autocast off and operands already in the autocast dtype
(``autocast``).
"""
