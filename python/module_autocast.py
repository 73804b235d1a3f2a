"""``MoEKDLoss`` as an ``nn.Module``, under bfloat16 autocast on CPU.

Under ``torch.autocast`` the linear layers return bfloat16 logits. The loss
takes them as they are (no ``.float()`` copy of the logits): it accumulates in
float32, returns a float32 loss, and hands back a bfloat16 gradient for the
logits, like ``F.cross_entropy`` does under autocast.

    python python/module_autocast.py            # a few seconds on CPU
    python python/module_autocast.py --tiny     # what the tests run
"""

import argparse

import torch
from torch import nn

from moekd_kernels import MoEKDLoss


class Distiller(nn.Module):
    """Student, frozen teacher and criterion in one module: ``forward`` returns the loss."""

    def __init__(self, student, teacher, criterion):
        super().__init__()
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()
        self.criterion = criterion

    def forward(self, x, y):
        student_logits = self.student(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        loss, stats = self.criterion(student_logits, teacher_logits, y)
        return loss, stats, student_logits


def mlp(num_features, hidden, num_classes):
    return nn.Sequential(nn.Linear(num_features, hidden), nn.GELU(), nn.Linear(hidden, num_classes))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--tiny", action="store_true", help="a few steps at small sizes")
    args = parser.parse_args(argv)
    if args.tiny:
        args.classes, args.steps = 50, 20

    torch.manual_seed(0)
    num_features, batch_size = 64, 256
    # A fixed random teacher defines the task; the labels are its samples, so they
    # sometimes disagree with its argmax, as real labels do.
    teacher = mlp(num_features, 256, args.classes)
    with torch.no_grad():
        teacher[-1].weight.mul_(8.0)   # a confident teacher: freshly initialised logits are near-flat
    criterion = MoEKDLoss(temperature=2.0, expert_strength=2.0, gate_weight=0.5,
                          expert_weight=0.5, return_stats=True)
    model = Distiller(mlp(num_features, 64, args.classes), teacher, criterion)
    print(model.criterion)
    opt = torch.optim.AdamW(model.student.parameters(), lr=3e-3)

    history = []
    for step in range(args.steps):
        x = torch.randn(batch_size, num_features)
        with torch.no_grad():
            y = torch.multinomial(teacher(x).softmax(-1), 1).squeeze(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, stats, logits = model(x, y)
        opt.zero_grad()
        loss.backward()            # the student's weights stay float32; autocast casts per op
        opt.step()
        history.append(stats.log_likelihood.mean().item())
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  logits {str(logits.dtype):14s} loss {str(loss.dtype):13s} "
                  f"{loss.item():.4f}  log-likelihood {history[-1]:+.4f}  "
                  f"agreement {stats.agreement.mean().item():.3f}")

    return {"log_likelihoods": history, "logits_dtype": logits.dtype, "loss_dtype": loss.dtype}


if __name__ == "__main__":
    main()
