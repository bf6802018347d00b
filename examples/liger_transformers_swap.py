"""Liger's older fused JSD (liger_kernel.transformers): swap one import line, same arguments and numbers."""
import torch

# from liger_kernel.transformers import LigerFusedLinearJSD
from gopd_fast.compat import LigerFusedLinearJSD


def main() -> float:
    g = torch.Generator().manual_seed(0)
    tokens, student_dim, teacher_dim, vocab = 64, 32, 48, 1000
    student_input = torch.randn(tokens, student_dim, generator=g, requires_grad=True)
    student_weight = torch.randn(vocab, student_dim, generator=g, requires_grad=True)
    teacher_input = torch.randn(tokens, teacher_dim, generator=g)
    teacher_weight = torch.randn(vocab, teacher_dim, generator=g)
    shift_labels = torch.randint(0, vocab, (tokens,), generator=g)
    shift_labels[:10] = -100  # ignored positions (shift_labels=None: every position counts)

    loss_fn = LigerFusedLinearJSD(jsd_beta=0.5, ignore_index=-100, temperature=1.0)
    loss = loss_fn(student_input, student_weight, teacher_input, teacher_weight, shift_labels)
    loss.backward()
    print(f"loss {loss.item():.4f}, |grad W| {student_weight.grad.norm():.4f}")
    return loss.item()


if __name__ == "__main__":
    main()
