"""Plain PyTorch: Guided-OPD loss from hidden states with FusedLinearKL (no [B, L, V] logits anywhere)."""
import torch

from gopd_fast import FusedLinearKL
from gopd_fast.models import build_model, tiny_qwen3_config


def main(steps: int = 3) -> list[float]:
    student = build_model(tiny_qwen3_config("student-tiny", vocab_size=512), seed=0)
    teacher = build_model(tiny_qwen3_config("teacher-tiny", vocab_size=512), seed=1).eval().requires_grad_(False)
    loss_fn = FusedLinearKL(student.lm_head, teacher.lm_head, temperature=1.0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)

    input_ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    loss_mask = torch.ones(2, 24, dtype=torch.bool)
    loss_mask[:, :8] = False  # prompt / observation tokens: no loss
    teacher_wrote = torch.zeros(2, 24, dtype=torch.bool)
    teacher_wrote[0, 8:16] = True  # a turn the teacher generated (guided turn)

    losses = []
    for _ in range(steps):
        # hidden states at positions 0..L-2 predict tokens 1..L-1
        h_s = student.model(input_ids=input_ids).last_hidden_state[:, :-1]
        with torch.no_grad():
            h_t = teacher.model(input_ids=input_ids).last_hidden_state[:, :-1]
        mask, by_teacher = loss_mask[:, 1:], teacher_wrote[:, 1:]
        loss = loss_fn(
            h_s, h_t,
            reverse_weight=mask & ~by_teacher,  # KL(p_s || p_t) on the student's own tokens
            forward_weight=mask & by_teacher,   # KL(p_t || p_s) on the teacher's tokens
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        print(f"loss {loss.item():.4f}")
    return losses


if __name__ == "__main__":
    main()
