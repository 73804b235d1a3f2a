"""MoE-KD inside TRL's GKD trainer: replace its divergence, keep everything else.

``MoEKDGKDTrainer`` subclasses ``trl.experimental.gkd.GKDTrainer`` and overrides
only ``compute_loss``: the student and teacher logits, the causal shift and the
labels (prompt and padding at -100, from TRL's ``DataCollatorForChatML``) are as
in TRL; the generalized JSD between them is replaced by ``fused_moe_kd_loss``.
TRL's data pipeline, on-policy generation (``lmbda``), ``seq_kd``, gradient
accumulation and logging are untouched. When Trainer passes
``num_items_in_batch`` (the label-token count of all accumulated micro-batches),
the loss is the token sum divided by it, as TRL's own loss does.

How the options map (see README, "TRL"): TRL's ``beta=0`` is the forward KL
KL(softmax(t/τ) ‖ softmax(s/τ)) at τ = 1 (``GKDTrainer.compute_loss`` evaluates
its divergence at temperature 1; ``GKDConfig.temperature`` is the sampling
temperature). Our ``expert_strength=0, expert_weight=0, gate_weight=1/τ²`` has
the same gradient; the logged values differ by the entropy of the teacher.

With ``lmbda > 0`` some batches are the student's own samples, and their labels
are the sampled tokens; MoE-KD treats labels as evidence about which teacher
prediction is right, so this example keeps ``lmbda=0`` (the dataset's answers)
unless told otherwise.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on Python
standard-library sources, the chat data are questions about stdlib functions
answered with their docstrings, and the teacher and student are tiny Llamas
built from ``LlamaConfig``. The teacher is first trained briefly on the same
answers so that it has something to teach.

    python python/trl_gkd_distillation.py            # about a minute on CPU
    python python/trl_gkd_distillation.py --tiny     # what the tests run
"""

import argparse
import importlib
import inspect
import math
import os
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from transformers.trainer_callback import PrinterCallback

# TRL 1.x keeps GKD under trl.experimental and warns on import; the warning says nothing here.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402
from trl.experimental.utils import DataCollatorForChatML  # noqa: E402

from moekd_kernels import fused_moe_kd_loss  # noqa: E402

IGNORE_INDEX = -100
# Pure-Python standard-library modules (their sources are the tokenizer's training text).
STDLIB_MODULES = ("json", "textwrap", "string", "collections", "functools", "pathlib", "shutil",
                  "argparse", "random", "statistics", "fractions", "difflib", "heapq", "calendar")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class MoEKDGKDTrainer(GKDTrainer):
    """GKD with the MoE-KD loss in place of the generalized JSD."""

    def __init__(self, *args, moekd_options=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.moekd_options = {**dict(temperature=1.0, expert_strength=2.0, gate_weight=1.0,
                                     expert_weight=1.0), **(moekd_options or {})}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student_outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_logits = self.teacher_model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits

        # Position i predicts token i + 1; prompt and padding positions carry -100.
        loss = fused_moe_kd_loss(
            student_outputs.logits[:, :-1, :], teacher_logits[:, :-1, :], inputs["labels"][:, 1:],
            ignore_index=IGNORE_INDEX, num_items_in_batch=num_items_in_batch, **self.moekd_options)
        return (loss, student_outputs) if return_outputs else loss


class PrintLoss(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            print(f"step {state.global_step}: loss {logs['loss']:.6f}", flush=True)


def stdlib_text():
    """Source code of a few standard-library modules: the tokenizer's training text."""
    for name in STDLIB_MODULES:
        yield inspect.getsource(importlib.import_module(name))


def stdlib_chats(limit=None):
    """[{"messages": [user question, assistant answer]}] from public stdlib docstrings."""
    chats = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or not callable(obj) or getattr(obj, "__module__", None) != name:
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            answer = doc.strip().split("\n\n")[0].replace("\n", " ")[:120]
            chats.append({"messages": [
                {"role": "user", "content": f"What does {name}.{attr} do?"},
                {"role": "assistant", "content": answer},
            ]})
    return chats[:limit]


def build_tokenizer(vocab_size):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(stdlib_text(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                      eos_token="</s>", model_max_length=512)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_llama(tokenizer, hidden, layers, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


def pretrain_teacher(teacher, collator, chats, steps, batch_size, seed):
    """A few steps of plain next-token cross-entropy on the answers."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    teacher.train()
    for _ in range(steps):
        idx = torch.randint(len(chats), (batch_size,), generator=gen).tolist()
        batch = collator([chats[i] for i in idx])
        out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=batch["labels"])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return teacher.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="student optimizer steps")
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size")
    parser.add_argument("--temperature", type=float, default=1.0, help="MoE-KD τ")
    parser.add_argument("--expert-strength", type=float, default=2.0,
                        help="MoE-KD β (0 with --expert-weight 0 and --gate-weight 1/τ² is TRL's beta=0)")
    parser.add_argument("--gate-weight", type=float, default=1.0, help="MoE-KD λ_g")
    parser.add_argument("--expert-weight", type=float, default=1.0, help="MoE-KD λ_e")
    parser.add_argument("--lmbda", type=float, default=0.0,
                        help="TRL's on-policy fraction (student-generated batches)")
    parser.add_argument("--output-dir", default=None, help="Trainer output directory (default: a temp dir)")
    parser.add_argument("--tiny", action="store_true", help="a few steps at small sizes (the tests)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.teacher_steps, args.vocab = 6, 20, 400
    max_length = 160

    tokenizer = build_tokenizer(args.vocab)
    chats = stdlib_chats(limit=64 if args.tiny else None)
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=max_length)
    teacher = pretrain_teacher(tiny_llama(tokenizer, 64, 2, seed=0), collator, chats,
                               args.teacher_steps, batch_size=8, seed=0)
    student = tiny_llama(tokenizer, 32, 1, seed=1)

    printer = PrintLoss()
    with tempfile.TemporaryDirectory() as scratch:
        config = GKDConfig(
            output_dir=args.output_dir or scratch, max_steps=args.steps, per_device_train_batch_size=4,
            gradient_accumulation_steps=2, learning_rate=3e-3, lr_scheduler_type="constant",
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
            activation_checkpointing=False, disable_tqdm=True, seed=0, max_length=max_length,
            lmbda=args.lmbda, max_new_tokens=16)
        trainer = MoEKDGKDTrainer(
            model=student, teacher_model=teacher, args=config, processing_class=tokenizer,
            train_dataset=Dataset.from_list(chats), callbacks=[printer],
            moekd_options=dict(temperature=args.temperature, expert_strength=args.expert_strength,
                               gate_weight=args.gate_weight, expert_weight=args.expert_weight))
        trainer.remove_callback(PrinterCallback)  # PrintLoss prints the losses, one line a step
        trainer.train()

    finite = all(math.isfinite(v) for v in printer.losses)
    print(f"{len(printer.losses)} steps, losses {'finite' if finite else 'NOT FINITE'}")
    return {"losses": printer.losses, "trainer": trainer}


if __name__ == "__main__":
    main()
