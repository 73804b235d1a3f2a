"""Distil a small causal LM from a larger one on real text, through the fused-linear loss.

The text is on every machine: the Python standard library's own source files, read
from the running interpreter's ``Lib`` directory. A byte-level BPE is trained on them
locally (``tokenizers``), and teacher and student are small Llama models built from
``transformers`` configs (no downloads). The teacher is trained first; then three
students from one initialisation are trained on the same batches:

- ``ce``: cross-entropy on the next token only;
- ``classic_kd``: Hinton KD, CE + τ²·KL(teacher ‖ student) (MoE-KD with β = 0, where
  the responsibilities equal the teacher's distribution: same gradient as classic KD);
- ``moe_kd``: MoE-KD (β = 2): the teacher's prediction is a latent variable whose
  posterior given the true token corrects the teacher where it is wrong.

Both KD students use ``fused_linear_moe_kd_loss`` on the models' last hidden states and
``lm_head.weight``: the (tokens × vocabulary) logits of student and teacher are never
formed. The script reports held-out perplexity of every model, and the peak extra
memory of one loss step (forward and backward from the hidden states) on the fused-linear
path against the materialised-logits path (``h @ W.T`` then ``fused_moe_kd_loss``).

    python python/lm_distillation.py --threads 1   # vocabulary 16k, ~10-20 min on a busy 2-core CPU
    python python/lm_distillation.py --tiny     # what the test runs (vocabulary 1k, seconds)
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import math
import sys
import sysconfig
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moekd_kernels import fused_linear_moe_kd_loss, fused_moe_kd_loss

IGNORE_INDEX = -100
# Not the library's source: tests and third-party packages installed beside it.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


class Settings(NamedTuple):
    vocab_size: int
    max_chars: int          # of source text read (train + held-out)
    seq_len: int
    batch_size: int
    teacher: Dict
    student: Dict
    teacher_steps: int
    student_steps: int
    lr: float
    eval_batches: int
    memory_batch: int       # sequences in the batch whose loss step is measured
    chunk_size: int


FULL = Settings(vocab_size=16384, max_chars=4_000_000, seq_len=128, batch_size=8,
                teacher=dict(hidden_size=192, intermediate_size=512, num_hidden_layers=3,
                             num_attention_heads=4),
                student=dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4),
                teacher_steps=300, student_steps=200, lr=2e-3, eval_batches=40, memory_batch=32,
                chunk_size=256)
TINY = Settings(vocab_size=1024, max_chars=200_000, seq_len=32, batch_size=8,
                teacher=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2),
                student=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2),
                teacher_steps=50, student_steps=30, lr=3e-3, eval_batches=8, memory_batch=64,
                chunk_size=64)


# --------------------------------------------------------------------------- data


def stdlib_sources(max_chars: int) -> List[str]:
    """The standard library's .py files, in a fixed order, up to ``max_chars`` characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not texts:
        raise RuntimeError(f"no Python sources found under {root}")
    return texts


def train_tokenizer(texts: List[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, show_progress=False)
    return tokenizer


def to_blocks(tokenizer, texts: List[str], seq_len: int) -> torch.Tensor:
    """All files' tokens, concatenated, cut into (num_blocks, seq_len)."""
    ids = [i for enc in tokenizer.encode_batch(texts) for i in enc.ids]
    num_blocks = len(ids) // seq_len
    return torch.tensor(ids[:num_blocks * seq_len], dtype=torch.long).view(num_blocks, seq_len)


# --------------------------------------------------------------------------- models


def make_model(vocab_size: int, seq_len: int, sizes: Dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=seq_len,
                         num_key_value_heads=sizes["num_attention_heads"], tie_word_embeddings=False,
                         **sizes)
    return LlamaForCausalLM(config)


def last_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T, H): the states the LM head reads (after the final norm)."""
    return model.model(input_ids=input_ids).last_hidden_state


def batches(blocks: torch.Tensor, batch_size: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield blocks[torch.randint(0, blocks.shape[0], (batch_size,), generator=g)]


STUDENT_LOSSES = {
    "ce": None,
    "classic_kd": dict(temperature=2.0, expert_strength=0.0, gate_weight=1.0, expert_weight=1.0),
    "moe_kd": dict(temperature=2.0, expert_strength=2.0, gate_weight=1.0, expert_weight=1.0),
}


def train(model, blocks, settings: Settings, steps: int, desc: str, teacher=None, kd_options=None,
          seed: int = 0) -> List[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    losses = []
    model.train()
    for input_ids in tqdm(batches(blocks, settings.batch_size, steps, seed), total=steps, desc=desc,
                          leave=False, file=sys.stdout, mininterval=1.0):
        target = input_ids[:, 1:]                      # position t predicts token t + 1
        hidden = last_hidden(model, input_ids)[:, :-1]
        if kd_options is None:
            logits = model.lm_head(hidden)
            loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        else:
            with torch.no_grad():
                teacher_hidden = last_hidden(teacher, input_ids)[:, :-1]
            loss = fused_linear_moe_kd_loss(hidden, model.lm_head.weight, teacher_hidden,
                                            teacher.lm_head.weight, target,
                                            chunk_size=settings.chunk_size, **kd_options)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int, max_batches: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for start in range(0, min(blocks.shape[0], batch_size * max_batches), batch_size):
        input_ids = blocks[start:start + batch_size]
        logits = model(input_ids=input_ids).logits[:, :-1]
        target = input_ids[:, 1:]
        total += float(F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
        count += target.numel()
    return math.exp(total / max(count, 1))


# --------------------------------------------------------------------------- memory


def _vm_hwm_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return None


def peak_extra_bytes(fn) -> Optional[int]:
    """Peak RSS during ``fn()`` minus the RSS before, on Linux (None elsewhere). Freed memory
    is handed back to the OS first (malloc_trim), so a cached buffer cannot hide a new one."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                               # reset the high-water mark
    except OSError:
        return None
    before = _rss_bytes()
    result = fn()
    peak = _vm_hwm_bytes()
    del result
    return None if before is None or peak is None else peak - before


def loss_step_memory(student, teacher, input_ids: torch.Tensor, chunk_size: int) -> Dict[str, Optional[int]]:
    """Peak extra memory of one loss step from the hidden states, fused vs materialised."""
    with torch.no_grad():
        hidden = last_hidden(student, input_ids)[:, :-1].contiguous()
        teacher_hidden = last_hidden(teacher, input_ids)[:, :-1].contiguous()
    target = input_ids[:, 1:]
    options = STUDENT_LOSSES["moe_kd"]
    w_s, w_t = student.lm_head.weight.detach(), teacher.lm_head.weight.detach()

    def fused():
        h = hidden.clone().requires_grad_(True)
        w = w_s.clone().requires_grad_(True)
        loss = fused_linear_moe_kd_loss(h, w, teacher_hidden, w_t, target, chunk_size=chunk_size, **options)
        return torch.autograd.grad(loss, (h, w))

    def materialised():
        h = hidden.clone().requires_grad_(True)
        w = w_s.clone().requires_grad_(True)
        teacher_logits = teacher_hidden @ w_t.T
        loss = fused_moe_kd_loss(h @ w.T, teacher_logits, target, **options)
        return torch.autograd.grad(loss, (h, w))

    fused(), materialised()                            # warm-up: kernel build, allocator
    return {"fused_linear": peak_extra_bytes(fused), "materialised": peak_extra_bytes(materialised)}


# --------------------------------------------------------------------------- main


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (what the test runs)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    args = parser.parse_args(argv)
    settings = TINY if args.tiny else FULL
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    texts = stdlib_sources(settings.max_chars)
    held_out = texts[::10]
    train_texts = [t for i, t in enumerate(texts) if i % 10]
    tokenizer = train_tokenizer(train_texts, settings.vocab_size)
    vocab_size = tokenizer.get_vocab_size()
    train_blocks = to_blocks(tokenizer, train_texts, settings.seq_len)
    eval_blocks = to_blocks(tokenizer, held_out, settings.seq_len)
    print(f"corpus: {len(texts)} stdlib files ({sum(map(len, texts)) / 1e6:.1f} M chars) from "
          f"{sysconfig.get_paths()['stdlib']}; BPE vocabulary {vocab_size}; "
          f"{train_blocks.numel()} training and {eval_blocks.numel()} held-out tokens")

    teacher = make_model(vocab_size, settings.seq_len, settings.teacher, seed=0)
    train(teacher, train_blocks, settings, settings.teacher_steps, "teacher (CE)", seed=1)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    initial_student = make_model(vocab_size, settings.seq_len, settings.student, seed=2)
    perplexities = {"teacher": perplexity(teacher, eval_blocks, settings.batch_size, settings.eval_batches),
                    "untrained_student": perplexity(initial_student, eval_blocks, settings.batch_size,
                                                    settings.eval_batches)}
    final_losses = {}
    students = {}
    for name, options in STUDENT_LOSSES.items():
        student = copy.deepcopy(initial_student)
        losses = train(student, train_blocks, settings, settings.student_steps, f"student ({name})",
                       teacher=None if options is None else teacher, kd_options=options, seed=3)
        final_losses[name] = sum(losses[-5:]) / len(losses[-5:])
        perplexities[name] = perplexity(student, eval_blocks, settings.batch_size, settings.eval_batches)
        students[name] = student

    memory_ids = train_blocks[:settings.memory_batch]
    memory = loss_step_memory(students["moe_kd"], teacher, memory_ids, settings.chunk_size)

    print(f"\nheld-out perplexity (uniform guess: {vocab_size}):")
    for name, value in perplexities.items():
        print(f"  {name:18s} {value:10.2f}")
    tokens = memory_ids[:, 1:].numel()
    print(f"\npeak extra memory of one MoE-KD loss step (fwd+bwd from the hidden states), "
          f"{tokens} tokens × V={vocab_size}, chunk_size={settings.chunk_size}:")
    buffer = tokens * vocab_size * 4
    for name, value in memory.items():
        shown = "n/a (Linux only)" if value is None else \
            f"{value / 2**20:8.1f} MiB ({value / buffer:.2f} × one tokens×V float32 buffer)"
        print(f"  {name:18s} {shown}")
    elapsed = time.perf_counter() - started
    print(f"\ndone in {elapsed:.0f} s")
    return {"perplexity": perplexities, "final_loss": final_losses, "memory": memory,
            "vocab_size": vocab_size, "seconds": elapsed}


if __name__ == "__main__":
    main()
