"""TRL: GKD with the fused loss. The trainer is TRL's; only the loss changes (hidden states, no full logits)."""
import os
import tempfile

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset
from trl.experimental.gkd import GKDConfig

from gopd_fast.compat.trl import FusedGKDTrainer  # instead of: from trl.experimental.gkd import GKDTrainer
from gopd_fast.models import build_model, config_for_tokenizer, load_model, save_model, train_tokenizer


def main(max_steps: int = 2) -> float:
    with tempfile.TemporaryDirectory(prefix="gopd_trl_gkd_") as workdir:
        # tiny local models: a tokenizer trained on a toy corpus, Qwen3-architecture student and teacher
        tokenizer = train_tokenizer([f"the fox {i} jumps over the dog {i}" for i in range(50)], vocab_size=400)
        for name, size, seed in (("student", "student-tiny", 0), ("teacher", "teacher-tiny", 1)):
            save_model(build_model(config_for_tokenizer(size, tokenizer), seed=seed), tokenizer, f"{workdir}/{name}")
        student, tokenizer = load_model(f"{workdir}/student")
        teacher, _ = load_model(f"{workdir}/teacher")

        dataset = Dataset.from_list([
            {"messages": [{"role": "user", "content": f"where is fox {i}?"},
                          {"role": "assistant", "content": f"the fox {i} jumps over the dog"}]}
            for i in range(8)
        ])
        args = GKDConfig(
            output_dir=f"{workdir}/out", max_steps=max_steps, per_device_train_batch_size=2, max_length=64,
            max_new_tokens=8, lmbda=0.5, beta=0.5, learning_rate=1e-3, report_to="none", use_cpu=True,
            save_strategy="no", logging_steps=1,
        )
        trainer = FusedGKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                                  train_dataset=dataset)
        result = trainer.train()
    print(f"training loss {result.training_loss:.4f}")
    return result.training_loss


if __name__ == "__main__":
    main()
