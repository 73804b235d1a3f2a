"""Vocab-parallel MoE-KD on the CPU: what sharding the classes costs, and what crosses the group.

    python benchmarks/vocab_parallel.py                        # N=512, C=65536, fp32, worlds 1 and 2
    python benchmarks/vocab_parallel.py --shape 256x131072 --worlds 1,2 --dtype bf16

Each world size runs in its own spawned gloo group; the CPU's threads are split evenly
over the ranks, so every line uses the same cores. Implementations, each a forward and
backward of the loss on every rank:

    fused          the unsharded fused call on the whole rows (world 1 only: the reference point)
    sharded        fused_moe_kd_loss(..., process_group=group) on this rank's slice
    gather_logits  the obvious alternative: all-gather the student and teacher slices, run
                   the unsharded fused call, keep this rank's slice of the gradient

Reported per implementation: the median time of rank 0 (after warm-up) and the bytes per row
that crossed the group in all-reduces (counted by the library's Communicator) or in the
all-gathers of the logits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _worker(rank: int, world: int, store: str, rows: int, classes: int, dtype_name: str, threads: int,
            reps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    # Before the group exists (see tests/test_vocab_parallel.py, _init).
    from moekd_kernels import benchmarking, fused_moe_kd_loss, vocab_parallel

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    group = dist.group.WORLD
    dtype = getattr(torch, DTYPES[dtype_name])
    shape = benchmarking.Shape(rows, classes, 1)
    student, teacher, target = benchmarking.make_inputs(shape, dtype, "cpu", seed=0)
    bounds = [classes * r // world for r in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    shard = student[:, lo:hi].contiguous().requires_grad_(True)
    teacher_shard = teacher[0, :, lo:hi].contiguous()
    options = dict(benchmarking.DEFAULT_OPTIONS)

    def sharded():
        shard.grad = None
        fused_moe_kd_loss(shard, teacher_shard, target, process_group=group, **options).backward()

    def gather_logits():
        shard.grad = None
        pieces = []
        for local in (shard.detach(), teacher_shard):
            parts = [local.new_empty(rows, bounds[r + 1] - bounds[r]) for r in range(world)]
            dist.all_gather(parts, local.contiguous(), group=group)
            pieces.append(torch.cat(parts, dim=1))
        full = pieces[0].requires_grad_(True)
        fused_moe_kd_loss(full, pieces[1], target, **options).backward()
        shard.grad = full.grad[:, lo:hi]

    full_student = student.clone().requires_grad_(True)

    def fused():
        full_student.grad = None
        fused_moe_kd_loss(full_student, teacher[0], target, **options).backward()

    element = torch.empty((), dtype=dtype).element_size()
    results = []
    impls = [("sharded", sharded), ("gather_logits", gather_logits)] + ([("fused", fused)] if world == 1 else [])
    for name, step in impls:
        dist.barrier()
        # A fixed count: every rank must run the same number of collectives.
        timing = benchmarking.time_fn(step, "cpu", warmup=2, min_reps=reps, max_reps=reps)
        if name == "sharded":
            sent = vocab_parallel.last_counts.bytes_reduced / rows
        elif name == "gather_logits":
            sent = 2 * classes * element   # the student's and the teacher's rows
        else:
            sent = 0
        results.append({"impl": name, "world": world, "N": rows, "C": classes, "dtype": dtype_name,
                        "threads_per_rank": threads, "median_ms": timing.median_s * 1e3,
                        "reps": timing.reps, "bytes_per_row": sent})
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def run(world: int, rows: int, classes: int, dtype_name: str, threads: int, reps: int):
    import torch.multiprocessing as mp

    tmp = tempfile.mkdtemp(prefix="moekd-vp-bench-")
    out = os.path.join(tmp, "result.json")
    mp.start_processes(_worker, args=(world, os.path.join(tmp, "store"), rows, classes, dtype_name,
                                      max(1, threads // world), reps, out),
                       nprocs=world, start_method="spawn")
    with open(out) as f:
        return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="512x65536", help="NxC")
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads shared by the ranks")
    p.add_argument("--reps", type=int, default=10, help="timed steps per implementation (after 2 warm-up)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows, classes = (int(v) for v in args.shape.split("x"))
    results = []
    for world in (int(w) for w in args.worlds.split(",")):
        results += run(world, rows, classes, args.dtype, args.threads, args.reps)
    fused = next((r["median_ms"] for r in results if r["impl"] == "fused"), None)
    print(f"| impl | world | threads/rank | ms | vs fused | bytes/row sent |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['median_ms'] / fused:.2f}×" if fused else "n/a"
        print(f"| {r['impl']} | {r['world']} | {r['threads_per_rank']} | {r['median_ms']:.1f} | {ratio} | "
              f"{r['bytes_per_row']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
