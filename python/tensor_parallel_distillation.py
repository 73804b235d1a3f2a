"""MoE-KD with the output layer split by rows over ranks (tensor parallelism).

Student and teacher each have a trunk, replicated on every rank, and an output layer
(V, H) whose rows are split over the ranks in contiguous slices (``torch.tensor_split``,
so the slices may differ in size). ``fused_linear_moe_kd_loss(..., process_group=group)``
takes this rank's rows and the replicated hidden states: every rank gets the loss of the
whole vocabulary, the gradient of its own rows, and the hidden states' whole gradient
(summed over the group), so the trunk's replicas take the same step on every rank.

    torchrun --nproc_per_node=2 python/tensor_parallel_distillation.py     # gloo on CPU, NCCL on GPUs
    python python/tensor_parallel_distillation.py                           # one process, the whole vocabulary
    python python/tensor_parallel_distillation.py --tiny --save weights.pt  # what the tests run
"""

# Before init_process_group: the package imports torch._dynamo, which imported after the
# group exists keeps it alive past destroy_process_group (README, "Past one device").
from moekd_kernels import fused_linear_moe_kd_loss

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch import nn


def make_models(num_features: int, hidden_size: int, num_classes: int):
    """(trunk, output layer) of the teacher and of the student, the same in every process."""
    torch.manual_seed(0)
    teacher = (nn.Sequential(nn.Linear(num_features, 64), nn.Tanh()), nn.Linear(64, num_classes))
    student = (nn.Sequential(nn.Linear(num_features, hidden_size), nn.Tanh()),
               nn.Linear(hidden_size, num_classes))
    return teacher, student


def row_shard(layer: nn.Linear, rank: int, world: int, device: torch.device):
    """This rank's contiguous rows of the layer's weight and bias, copied out of the layer."""
    return [torch.tensor_split(p.detach(), world)[rank].to(device, copy=True) for p in (layer.weight, layer.bias)]


def gather_rows(shard: torch.Tensor, num_rows: int, world: int) -> torch.Tensor:
    """The whole tensor from every rank's ``tensor_split`` rows; all_gather takes equal
    sizes, so each shard travels padded to the largest."""
    sizes = [len(rows) for rows in torch.arange(num_rows).tensor_split(world)]
    padded = shard.new_zeros(max(sizes), *shard.shape[1:])
    padded[:len(shard)] = shard
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


@torch.no_grad()
def global_batches(num_steps: int, batch_size: int, num_features: int, teacher):
    """The same batches in every process: the batch is replicated, the vocabulary is split.
    The labels are the (whole) teacher's predictions, 20% of them replaced by noise: a task
    the student can learn, and on which the teacher is sometimes wrong."""
    gen = torch.Generator().manual_seed(1)
    teacher_trunk, teacher_head = teacher
    for _ in range(num_steps):
        x = torch.randn(batch_size, num_features, generator=gen)
        y = teacher_head(teacher_trunk(x)).argmax(-1)
        noisy = torch.rand(batch_size, generator=gen) < 0.2
        y[noisy] = torch.randint(teacher_head.out_features, (int(noisy.sum()),), generator=gen)
        y[torch.rand(batch_size, generator=gen) < 0.25] = -100  # unlabelled tokens, as in LM batches
        yield x, y


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--classes", type=int, default=1001)
    parser.add_argument("--tiny", action="store_true", help="a few steps at small sizes")
    parser.add_argument("--save", help="write the trained trunk and the whole output layer here (rank 0)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.classes = 5, 51  # an odd vocabulary: slices of 26 and 25 rows on 2 ranks

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        use_cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    group = dist.group.WORLD if distributed else None
    device = torch.device("cuda", torch.cuda.current_device()) if distributed and torch.cuda.is_available() \
        else torch.device("cpu")

    num_features, hidden_size, batch_size = 16, 32, 48
    teacher, (trunk, head) = make_models(num_features, hidden_size, args.classes)
    labeller = copy.deepcopy(teacher)  # the whole teacher, on the CPU, for global_batches
    teacher_trunk, teacher_head = teacher
    teacher_trunk = teacher_trunk.requires_grad_(False).eval().to(device)
    teacher_weight, teacher_bias = row_shard(teacher_head, rank, world, device)
    trunk = trunk.to(device)
    weight, bias = (nn.Parameter(p) for p in row_shard(head, rank, world, device))
    optimizer = torch.optim.SGD([*trunk.parameters(), weight, bias], lr=0.5)

    for step, (x, y) in enumerate(global_batches(args.steps, batch_size, num_features, labeller)):
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            teacher_hidden = teacher_trunk(x)
        loss = fused_linear_moe_kd_loss(trunk(x), weight, teacher_hidden, teacher_weight, y,
                                        student_bias=bias, teacher_bias=teacher_bias,
                                        temperature=2.0, process_group=group)
        optimizer.zero_grad()
        loss.backward()  # the trunk's gradient is whole on every rank: the library sums it
        optimizer.step()
        if rank == 0 and (step % max(args.steps // 5, 1) == 0 or step == args.steps - 1):
            print(f"step {step}: loss {loss.item():.4f}")  # the whole vocabulary's loss

    if args.save:
        # Every rank joins the gathers; rank 0 writes.
        full_weight, full_bias = (gather_rows(p.detach(), args.classes, world) if distributed else p.detach()
                                  for p in (weight, bias))
        if rank == 0:
            state = {f"trunk.{k}": v.cpu() for k, v in trunk.state_dict().items()}
            state.update({"head.weight": full_weight.cpu(), "head.bias": full_bias.cpu()})
            torch.save(state, args.save)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
