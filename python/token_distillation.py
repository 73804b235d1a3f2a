"""Token-level MoE-KD for causal language models, as LLM trainers do it.

Logits are ``(B, T, V)``; the label at position t is the token at t + 1, so
logits and labels are shifted against each other, and padding carries the
label ``-100`` that the loss ignores (the mean is over real tokens only).

The teacher here is also used at two temperatures at once (two "levels" of the
mixture): ``teacher_logits.expand(2, ...)`` is a view, not a copy.

    python python/token_distillation.py            # a few seconds on CPU
    python python/token_distillation.py --tiny     # what the tests run
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from moekd_kernels import fused_moe_kd_loss

IGNORE_INDEX = -100
PAD_ID = 0


class TinyCausalLM(nn.Module):
    """Embedding → causal convolution → vocabulary head.

    Position t sees tokens t-2..t only, so right padding changes nothing before it.
    """

    def __init__(self, vocab_size, hidden, context=3):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab_size, hidden)
        self.conv = nn.Conv1d(hidden, hidden, kernel_size=context)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, input_ids):
        h = self.embed(input_ids).transpose(1, 2)           # (B, hidden, T)
        h = F.pad(h, (self.context - 1, 0))                 # left padding keeps it causal
        return self.head(F.relu(self.conv(h)).transpose(1, 2))   # (B, T, V)


def make_batch(transitions, batch_size, max_len, generator):
    """Sequences from a random Markov chain, right-padded to ``max_len``; labels = ids with -100 at padding."""
    vocab_size = transitions.shape[0]
    ids = torch.full((batch_size, max_len), PAD_ID, dtype=torch.long)
    lengths = torch.randint(max_len // 2, max_len + 1, (batch_size,), generator=generator)
    token = torch.randint(1, vocab_size, (batch_size,), generator=generator)
    for t in range(max_len):
        ids[:, t] = torch.where(t < lengths, token, PAD_ID)
        token = torch.multinomial(transitions[token], 1, generator=generator).squeeze(1)
    labels = ids.masked_fill(ids == PAD_ID, IGNORE_INDEX)
    return ids, labels


def shifted(logits, labels):
    """Predictions at t score the token at t + 1: drop the last logit and the first label."""
    return logits[:, :-1, :], labels[:, 1:]


@torch.no_grad()
def heldout_ce(model, ids, labels):
    s, y = shifted(model(ids), labels)
    return F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX).item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--tiny", action="store_true", help="a few dozen steps at small sizes")
    args = parser.parse_args(argv)
    if args.tiny:
        args.vocab, args.steps = 64, 40
    batch_size, max_len = 16, 32

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    # Each token has a few likely successors (token 0 is padding and never generated).
    logits = torch.randn(args.vocab, args.vocab, generator=gen) * 3.0
    logits[:, PAD_ID] = float("-inf")
    transitions = logits.softmax(-1)

    teacher = TinyCausalLM(args.vocab, 128)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(args.steps):
        ids, labels = make_batch(transitions, batch_size, max_len, gen)
        s, y = shifted(teacher(ids), labels)
        loss = F.cross_entropy(s.reshape(-1, args.vocab), y.reshape(-1), ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()

    student = TinyCausalLM(args.vocab, 32)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    held_out = make_batch(transitions, 64, max_len, gen)
    result = {"student_ce_before": heldout_ce(student, *held_out)}
    history = []
    for step in range(args.steps):
        ids, labels = make_batch(transitions, batch_size, max_len, gen)
        with torch.no_grad():
            teacher_logits = teacher(ids)
        student_logits, targets = shifted(student(ids), labels)
        teacher_logits, _ = shifted(teacher_logits, labels)
        # Leading dims are flattened inside: (B, T-1, V) with (B, T-1) targets, and the
        # teacher as (L, B, T-1, V). No reshape, no .contiguous() needed on your side.
        loss, stats = fused_moe_kd_loss(
            student_logits,
            teacher_logits.expand(2, *teacher_logits.shape),
            targets,
            temperature=[1.0, 4.0],
            expert_strength=2.0,
            gate_weight=0.5,
            expert_weight=0.5,
            ignore_index=IGNORE_INDEX,
            return_stats=True,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        # Stats are shaped like the targets and 0 at ignored positions. The loss is an
        # EM surrogate whose value can rise as the responsibilities shift; the label's
        # log-likelihood is what EM increases.
        real = targets != IGNORE_INDEX
        history.append(stats.log_likelihood[real].mean().item())
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  tokens {int(real.sum())}/{real.numel()}  "
                  f"log-likelihood {history[-1]:+.4f}  agreement {stats.agreement[real].mean().item():.3f}")

    result["log_likelihoods"] = history
    result["teacher_ce"] = heldout_ce(teacher, *held_out)
    result["student_ce"] = heldout_ce(student, *held_out)
    print(f"held-out next-token cross-entropy: teacher {result['teacher_ce']:.3f}, student "
          f"{result['student_ce']:.3f} (before distillation {result['student_ce_before']:.3f})")
    return result


if __name__ == "__main__":
    main()
