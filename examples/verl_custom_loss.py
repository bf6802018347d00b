"""A verl / tinker style custom loss: on-policy distillation as policy gradient, or against a top-k teacher.

Both read the student's hidden states and lm_head weight instead of [B, T, V] logits. The teacher is remote
(e.g. a vLLM server): it returns, per response token, the log-prob of the sampled token and its top-k.
"""
import torch

from gopd_fast import fused_linear_logprob, fused_linear_topk_kl


def opd_policy_gradient_loss(hidden, lm_head_weight, response_ids, old_logprob, teacher_logprob, response_mask,
                             clip_eps=0.2):
    """PPO-clipped policy gradient with the per-token reward log p_t(x) - log p_s(x) (reverse-KL estimator)."""
    logprob, entropy = fused_linear_logprob(hidden, lm_head_weight, response_ids, return_entropy=True)
    advantage = (teacher_logprob - old_logprob).detach()
    ratio = torch.exp(logprob - old_logprob)
    pg = -torch.minimum(ratio * advantage, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantage)
    mask = response_mask.float()
    return (pg * mask).sum() / mask.sum(), (entropy * mask).sum() / mask.sum()


def topk_distillation_loss(hidden, lm_head_weight, teacher_topk_ids, teacher_topk_logprobs, response_mask):
    """Reverse KL on the teacher's top-k support plus one tail bucket for the rest of the vocabulary."""
    return fused_linear_topk_kl(hidden, lm_head_weight, teacher_topk_ids, teacher_topk_logprobs,
                                reverse_weight=response_mask.float(), reduction="sum") / response_mask.sum()


def main() -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    batch, resp_len, dim, vocab, k = 2, 16, 32, 500, 8
    hidden = torch.randn(batch * resp_len, dim, generator=g, requires_grad=True)  # backbone output, flattened
    lm_head_weight = torch.randn(vocab, dim, generator=g, requires_grad=True)
    response_ids = torch.randint(0, vocab, (batch * resp_len,), generator=g)
    response_mask = torch.ones(batch * resp_len, dtype=torch.bool)
    response_mask[-5:] = False  # padding after EOS
    # what the rollout workers and the remote teacher would have returned:
    with torch.no_grad():
        old_logprob = fused_linear_logprob(hidden, lm_head_weight, response_ids)
        teacher_logits = torch.randn(batch * resp_len, vocab, generator=g) * 3
        teacher_logprob = torch.log_softmax(teacher_logits, -1).gather(1, response_ids[:, None]).squeeze(1)
        topk_logprobs, topk_ids = torch.log_softmax(teacher_logits, -1).topk(k, dim=-1)

    pg_loss, entropy = opd_policy_gradient_loss(hidden, lm_head_weight, response_ids, old_logprob, teacher_logprob,
                                                response_mask)
    kl_loss = topk_distillation_loss(hidden, lm_head_weight, topk_ids, topk_logprobs, response_mask)
    (pg_loss + kl_loss).backward()
    print(f"pg loss {pg_loss.item():.4f}, entropy {entropy.item():.3f}, top-k KL {kl_loss.item():.4f}")
    return pg_loss.item(), kl_loss.item()


if __name__ == "__main__":
    main()
