"""MoE-KD inside Hugging Face ``transformers.Trainer``: override ``compute_loss``.

``MoEKDTrainer`` runs the frozen teacher on the same batch, shifts logits and
labels as causal LMs do, and calls ``fused_moe_kd_loss``. It follows Trainer's
token accounting: when Trainer passes ``num_items_in_batch`` (the number of
label tokens over all gradient-accumulation micro-batches), the loss is the
token sum divided by it, so accumulation gives the same gradient as one big
batch; otherwise it is the mean over this micro-batch's tokens and Trainer
divides by the accumulation steps itself.

The models here are tiny, randomly initialised Llama configs built locally
(nothing is downloaded). The teacher is first trained with the stock Trainer,
then the student is distilled from it.

    python python/hf_trainer.py            # a few seconds on CPU
    python python/hf_trainer.py --tiny     # what the tests run
"""

import argparse
import tempfile

import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from moekd_kernels import fused_moe_kd_loss

IGNORE_INDEX = -100


class MoEKDTrainer(Trainer):
    def __init__(self, *args, teacher_model, moekd_options=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher_model.to(self.args.device).eval()
        self.teacher.requires_grad_(False)
        self.moekd_options = dict(temperature=2.0, expert_strength=2.0, gate_weight=0.5,
                                  expert_weight=0.5, **(moekd_options or {}))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs)            # no labels: the model computes no loss of its own
        with torch.no_grad():
            teacher_logits = self.teacher(**model_inputs).logits

        # Position t predicts token t + 1.
        student_logits = outputs.logits[:, :-1, :]
        teacher_logits = teacher_logits[:, :-1, :]
        targets = labels[:, 1:]

        if num_items_in_batch is None:
            loss = fused_moe_kd_loss(student_logits, teacher_logits, targets,
                                     ignore_index=IGNORE_INDEX, reduction="mean",
                                     **self.moekd_options)
        else:
            loss = fused_moe_kd_loss(student_logits, teacher_logits, targets,
                                     ignore_index=IGNORE_INDEX, reduction="sum",
                                     **self.moekd_options) / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                # num_items_in_batch is then summed over all ranks while DDP averages the
                # gradients over them: undo the average, as Trainer's own compute_loss does.
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


class MarkovTextDataset(Dataset):
    """Token sequences from a random Markov chain, right-padded; labels are -100 on padding."""

    def __init__(self, num_sequences, vocab_size, max_len, seed):
        gen = torch.Generator().manual_seed(seed)
        chain_gen = torch.Generator().manual_seed(1234)      # one "language" for every split
        transitions = (torch.randn(vocab_size, vocab_size, generator=chain_gen) * 3.0)
        transitions[:, 0] = float("-inf")                    # token 0 is padding
        transitions = transitions.softmax(-1)
        self.items = []
        for _ in range(num_sequences):
            length = int(torch.randint(max_len // 2, max_len + 1, (), generator=gen))
            ids = [int(torch.randint(1, vocab_size, (), generator=gen))]
            for _ in range(length - 1):
                ids.append(int(torch.multinomial(transitions[ids[-1]], 1, generator=gen)))
            pad = max_len - length
            self.items.append({
                "input_ids": torch.tensor(ids + [0] * pad),
                "attention_mask": torch.tensor([1] * length + [0] * pad),
                "labels": torch.tensor(ids + [IGNORE_INDEX] * pad),
            })

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def tiny_llama(vocab_size, hidden, layers, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def training_args(output_dir, steps, **overrides):
    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=8,
        per_device_eval_batch_size=16, learning_rate=3e-3, warmup_steps=0,
        logging_steps=max(1, steps // 5), save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, seed=0, **overrides)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--tiny", action="store_true", help="a few steps at small sizes")
    args = parser.parse_args(argv)
    if args.tiny:
        args.vocab, args.steps = 64, 16
    max_len = 24

    train = MarkovTextDataset(256, args.vocab, max_len, seed=0)
    held_out = MarkovTextDataset(64, args.vocab, max_len, seed=1)

    with tempfile.TemporaryDirectory() as out:
        # 1. The teacher: the stock Trainer, the model computes its own shifted cross-entropy.
        teacher = tiny_llama(args.vocab, 64, 2, seed=0)
        Trainer(model=teacher, args=training_args(out, args.steps), train_dataset=train).train()

        # 2. The student, distilled with MoE-KD; gradient accumulation exercises num_items_in_batch.
        student = tiny_llama(args.vocab, 32, 1, seed=1)
        trainer = MoEKDTrainer(
            model=student,
            args=training_args(out, args.steps, gradient_accumulation_steps=2),
            train_dataset=train,
            eval_dataset=held_out,
            teacher_model=teacher,
        )
        before = trainer.evaluate()["eval_loss"]
        trainer.train()
        after = trainer.evaluate()["eval_loss"]

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"student held-out MoE-KD loss: {before:.4f} before, {after:.4f} after distillation")
    return {"train_losses": losses, "eval_loss_before": before, "eval_loss_after": after,
            "trainer": trainer}


if __name__ == "__main__":
    main()
