"""MoE-KD under DistributedDataParallel: each rank distils on its share of the batch.

A frozen teacher and a DDP-wrapped student; each rank holds a slice of every
global batch. The loss divides by the number of labelled tokens of the whole
global batch (``num_items_in_batch``), summed across ranks with one all-reduce,
so that the update equals one process training on the whole batch: DDP averages
the ranks' gradients, so each rank passes ``num_items_in_batch = total / world``.

    torchrun --nproc_per_node=2 python/ddp_distillation.py          # gloo on CPU, NCCL on GPUs
    python python/ddp_distillation.py                                # one process, the whole batch
    python python/ddp_distillation.py --tiny --save weights.pt       # what the tests run
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moekd_kernels import fused_moe_kd_loss


def make_models(num_features: int, num_classes: int):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(num_features, 64), nn.Tanh(), nn.Linear(64, num_classes))
    student = nn.Linear(num_features, num_classes)
    return teacher.requires_grad_(False).eval(), student


def global_batches(num_steps: int, batch_size: int, num_features: int, num_classes: int):
    """The same global batches in every process (and for any world size)."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(num_steps):
        x = torch.randn(batch_size, num_features, generator=gen)
        y = torch.randint(num_classes, (batch_size,), generator=gen)
        y[torch.rand(batch_size, generator=gen) < 0.25] = -100  # unlabelled tokens, as in LM batches
        yield x, y


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--tiny", action="store_true", help="a few steps at small sizes")
    parser.add_argument("--save", help="write the trained student's state_dict here (rank 0)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.classes = 5, 50

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        use_cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = torch.device("cuda", torch.cuda.current_device()) if distributed and torch.cuda.is_available() \
        else torch.device("cpu")

    num_features, batch_size = 16, 48
    teacher, student = make_models(num_features, args.classes)
    teacher, student = teacher.to(device), student.to(device)
    model = DistributedDataParallel(student) if distributed else student
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    for step, (x, y) in enumerate(global_batches(args.steps, batch_size, num_features, args.classes)):
        x, y = x.chunk(world)[rank].to(device), y.chunk(world)[rank].to(device)
        labelled = (y != -100).sum()
        if distributed:
            dist.all_reduce(labelled)  # the global batch's labelled-token count, on the device
        with torch.no_grad():
            teacher_logits = teacher(x)
        loss = fused_moe_kd_loss(model(x), teacher_logits, y, temperature=2.0,
                                 num_items_in_batch=labelled / world)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(args.steps // 5, 1) == 0 or step == args.steps - 1:
            global_loss = loss.detach() / world  # this rank's part of the global batch's loss
            if distributed:
                dist.all_reduce(global_loss)
            if rank == 0:
                print(f"step {step}: loss {global_loss.item():.4f}")

    if args.save and rank == 0:
        torch.save({k: v.cpu() for k, v in student.state_dict().items()}, args.save)
    if distributed:
        # DDP's reducer holds the group: freed at exit instead, the group's destructor would
        # wait for gloo's threads while holding the GIL, which one of them may still need to
        # free a tensor of the last collective (a hang about one run in ten).
        del model
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
