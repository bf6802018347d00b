"""A Liger-Kernel user: swap one import line, keep every argument and get the same numbers."""
import torch

# from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
from gopd_fast.compat import LigerFusedLinearJSDLoss


def main() -> float:
    g = torch.Generator().manual_seed(0)
    tokens, student_dim, teacher_dim, vocab = 64, 32, 48, 1000
    student_input = torch.randn(tokens, student_dim, generator=g, requires_grad=True)
    student_weight = torch.randn(vocab, student_dim, generator=g, requires_grad=True)
    teacher_input = torch.randn(tokens, teacher_dim, generator=g)
    teacher_weight = torch.randn(vocab, teacher_dim, generator=g)
    true_labels = torch.randint(0, vocab, (tokens,), generator=g)
    true_labels[:10] = -100  # ignored positions

    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, temperature=1.0)
    loss = loss_fn(student_input, student_weight, teacher_input, teacher_weight, true_labels)
    loss.backward()
    print(f"loss {loss.item():.4f}, |grad W| {student_weight.grad.norm():.4f}")
    return loss.item()


if __name__ == "__main__":
    main()
