"""Offline distillation from a stored top-k teacher.

The teacher runs once over the training set, and only its top-k log-probabilities per
example are written to a file (K of C values). The student is then distilled from the
file alone, with ``TopKTeacher``: the teacher is never run again and never held as N×C.

    python python/topk_offline_distillation.py                  # 100 classes, K=10
    python python/topk_offline_distillation.py --tiny           # what the tests run
"""

import argparse
import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from moekd_kernels import TopKTeacher, fused_moe_kd_loss


def make_data(num_samples, centers, generator):
    """Gaussian blobs around overlapping class centers, so that the teacher errs at times."""
    num_classes, num_features = centers.shape
    y = torch.randint(num_classes, (num_samples,), generator=generator)
    return centers[y] + torch.randn(num_samples, num_features, generator=generator), y


def mlp(num_features, hidden, num_classes):
    return nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


@torch.no_grad()
def accuracy(model, x, y):
    return (model(x).argmax(-1) == y).float().mean().item()


@torch.no_grad()
def store_top_k(teacher, x, k, path, batch_size=1024):
    """One pass of the teacher: top-k log-probabilities and their classes, to ``path``."""
    indices, values = [], []
    for start in range(0, len(x), batch_size):
        log_probs = F.log_softmax(teacher(x[start:start + batch_size]), dim=-1)
        top = log_probs.topk(k, dim=-1)
        indices.append(top.indices.to(torch.int32))   # C < 2^31: half the bytes of int64
        values.append(top.values.to(torch.bfloat16))  # log-probs need few bits
    torch.save({"indices": torch.cat(indices), "values": torch.cat(values)}, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--file", help="where to store the teacher's top-k (default: a temporary file)")
    parser.add_argument("--tiny", action="store_true", help="small sizes, a few dozen steps")
    args = parser.parse_args(argv)
    if args.tiny:
        args.classes, args.k, args.steps = 50, 5, 60

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    num_features, batch_size = 32, 128
    centers = torch.randn(args.classes, num_features, generator=gen) * 0.6
    x_train, y_train = make_data(4096, centers, gen)
    x_test, y_test = make_data(1024, centers, gen)

    # 1. The teacher, trained as usual, run once over the training set.
    teacher = mlp(num_features, 256, args.classes)
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for _ in range(args.steps):
        idx = torch.randint(len(y_train), (batch_size,), generator=gen)
        loss = F.cross_entropy(teacher(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()
    path = args.file or os.path.join(tempfile.mkdtemp(), "teacher_top_k.pt")
    store_top_k(teacher, x_train, args.k, path)
    dense_bytes = len(x_train) * args.classes * 4
    print(f"stored the teacher's top-{args.k} log-probs in {path}: "
          f"{os.path.getsize(path) / 1e6:.2f} MB (dense float32 logits: {dense_bytes / 1e6:.1f} MB)")
    teacher_accuracy = accuracy(teacher, x_test, y_test)
    del teacher                                   # from here on, only the file

    # 2. A smaller student, distilled from the file.
    stored = torch.load(path)
    student = mlp(num_features, 32, args.classes)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    history = []
    for step in range(args.steps):
        idx = torch.randint(len(y_train), (batch_size,), generator=gen)
        teacher_top_k = TopKTeacher(stored["indices"][idx], stored["values"][idx], kind="logprobs")
        loss = fused_moe_kd_loss(student(x_train[idx]), teacher_top_k, y_train[idx],
                                 temperature=4.0, expert_strength=2.0, gate_weight=0.9, expert_weight=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    result = {"losses": history, "teacher_accuracy": teacher_accuracy,
              "student_accuracy": accuracy(student, x_test, y_test), "file_bytes": os.path.getsize(path),
              "dense_bytes": dense_bytes}
    print(f"teacher test accuracy {result['teacher_accuracy']:.3f}, "
          f"student test accuracy {result['student_accuracy']:.3f}")
    return result


if __name__ == "__main__":
    main()
