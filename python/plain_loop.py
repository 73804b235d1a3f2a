"""MoE-KD in a plain PyTorch training loop.

A teacher MLP is trained with cross-entropy, then a smaller student is distilled
from it with ``fused_moe_kd_loss``. The only change from a classic KD loop is the
loss call: it takes the raw teacher logits (no softmax, no temperature scaling on
your side) and the labels, and returns the loss with its gradient already fused.

    python python/plain_loop.py            # a few seconds on CPU
    python python/plain_loop.py --tiny     # what the tests run
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from moekd_kernels import fused_moe_kd_loss


def make_data(num_samples, centers, generator):
    """Gaussian blobs around class centers that overlap, so that a teacher makes some mistakes."""
    num_classes, num_features = centers.shape
    y = torch.randint(num_classes, (num_samples,), generator=generator)
    x = centers[y] + torch.randn(num_samples, num_features, generator=generator)
    return x, y


def mlp(num_features, hidden, num_classes):
    return nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


@torch.no_grad()
def accuracy(model, x, y):
    return (model(x).argmax(-1) == y).float().mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tiny", action="store_true", help="a few dozen steps at small sizes")
    args = parser.parse_args(argv)
    if args.tiny:
        args.classes, args.steps = 20, 60

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    num_features, batch_size = 32, 128
    centers = torch.randn(args.classes, num_features, generator=gen) * 0.6
    x_train, y_train = make_data(4096, centers, gen)
    x_test, y_test = make_data(1024, centers, gen)

    # 1. A teacher, trained on the labels as usual.
    teacher = mlp(num_features, 256, args.classes)
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for _ in range(args.steps):
        idx = torch.randint(len(y_train), (batch_size,), generator=gen)
        loss = F.cross_entropy(teacher(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()

    # 2. A smaller student, distilled from it.
    student = mlp(num_features, 32, args.classes)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    history = []
    for step in range(args.steps):
        idx = torch.randint(len(y_train), (batch_size,), generator=gen)
        with torch.no_grad():                      # the teacher is a constant
            teacher_logits = teacher(x_train[idx])
        loss, stats = fused_moe_kd_loss(
            student(x_train[idx]), teacher_logits, y_train[idx],
            temperature=4.0,          # softens the teacher's prediction (the gate)
            expert_strength=2.0,      # β: how strongly the label corrects the teacher
            gate_weight=0.9,          # λ_g, like KD's weight on the KL term
            expert_weight=0.1,        # λ_e, like KD's weight on cross-entropy
            return_stats=True,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        # The loss includes the constant λ_g τ² H(teacher), so it sits well above
        # zero; the label's log-likelihood is the number to watch.
        history.append(loss.item())
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            # agreement: posterior probability that the teacher's prediction is the label
            print(f"step {step:4d}  loss {loss.item():.4f}  "
                  f"log-likelihood {stats.log_likelihood.mean().item():+.4f}  "
                  f"agreement {stats.agreement.mean().item():.3f}")

    result = {
        "losses": history,
        "teacher_accuracy": accuracy(teacher, x_test, y_test),
        "student_accuracy": accuracy(student, x_test, y_test),
    }
    print(f"teacher test accuracy {result['teacher_accuracy']:.3f}, "
          f"student test accuracy {result['student_accuracy']:.3f}")
    return result


if __name__ == "__main__":
    main()
