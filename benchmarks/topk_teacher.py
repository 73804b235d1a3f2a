"""A top-k teacher against the dense teacher it stands for, on the CPU: fwd+bwd time and
peak extra memory, each implementation in a fresh process.

    python benchmarks/topk_teacher.py                          # N=1024, C=131072, K=32,256, fp32,bf16
    python benchmarks/topk_teacher.py --shapes 256x32768 --ks 32 --dtypes fp32

Implementations:
    topk_moekd         fused_moe_kd_loss with a TopKTeacher (no N×C teacher)
    dense_moekd        fused_moe_kd_loss (backend 'auto') with the densified teacher, built
                       beforehand (its memory is not counted; its time is not either)
    torch_topk_kd      plain PyTorch top-k KD: scatter the top-k into a dense −inf tensor,
                       then F.kl_div and F.cross_entropy (classic KD, not MoE-KD), each step
    topk_cpu_kernel    (with --impls) the CPU kernel alone, cpu_backend.forward with the
    dense_cpu_kernel   backend's top-k rows or the densified teacher: no input checks, no
                       autograd; what the teacher loader itself costs

Peak extra memory is measured as in peak_memory.py (VmHWM reset after a warm-up step),
in units of one N×C float32 buffer; the returned gradient counts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
IMPLS = ("topk_moekd", "dense_moekd", "torch_topk_kd")


def _child(impl: str, dtype_name: str, rows: int, classes: int, k: int) -> dict:
    import psutil
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from moekd_kernels import TopKTeacher, benchmarking, fused_moe_kd_loss

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from peak_memory import _vm_hwm_bytes

    dtype = getattr(torch, DTYPES[dtype_name])
    g = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(rows, classes, generator=g)).to(dtype)
    target = torch.randint(0, classes, (rows,), generator=g)
    teacher_logits = 3 * torch.randn(rows, classes, generator=g)
    values, indices = teacher_logits.topk(k, dim=-1)
    del teacher_logits
    values = values.to(dtype)
    teacher = TopKTeacher(indices, values, "logits")
    options = dict(temperature=4.0, expert_strength=2.0)

    if impl == "topk_moekd":
        def loss_fn(s, t, y):
            return fused_moe_kd_loss(s, teacher, y, **options)
        dense = None
    elif impl == "dense_moekd":
        dense = teacher.to_dense(classes).to(dtype)

        def loss_fn(s, t, y):
            return fused_moe_kd_loss(s, dense, y, **options)
    elif impl in ("topk_cpu_kernel", "dense_cpu_kernel"):
        from moekd_kernels import cpu_backend
        from moekd_kernels.options import resolve_options
        from moekd_kernels.teachers import topk_rows

        opts = resolve_options(1, level_weights=None, gate_weight=1.0, expert_weight=1.0, ignore_index=-100,
                               **options)
        dense = (topk_rows(teacher, 1, 1, rows, classes) if impl == "topk_cpu_kernel"
                 else teacher.to_dense(classes).to(dtype)[None])

        def step():
            return cpu_backend.forward(student, dense, target, opts)[3]

        step()
        timing = benchmarking.time_fn(step, "cpu", warmup=1, min_reps=3, max_reps=20, target_s=3.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = psutil.Process().memory_info().rss
        grad = step()
        peak = _vm_hwm_bytes()
        del grad
        return {"impl": impl, "dtype": dtype_name, "N": rows, "C": classes, "K": k,
                "median_ms": timing.median_s * 1e3, "reps": timing.reps,
                "peak_extra_fp32_buffers": (peak - before) / (rows * classes * 4)}
    else:
        dense = None

        def loss_fn(s, t, y):
            full = torch.full(s.shape, -torch.inf, dtype=s.dtype).scatter(1, indices, values)
            tau = options["temperature"]
            kl = F.kl_div(F.log_softmax(s.float() / tau, -1), F.log_softmax(full.float() / tau, -1),
                          log_target=True, reduction="batchmean")
            return F.cross_entropy(s.float(), y) + tau * tau * kl

    step = benchmarking.make_step(lambda s, t, y: loss_fn(s, t, y), student, None, target, options={})
    step()                                        # warm-up
    timing = benchmarking.time_fn(step, "cpu", warmup=1, min_reps=3, max_reps=20, target_s=3.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = psutil.Process().memory_info().rss
    grad = step()
    peak = _vm_hwm_bytes()
    del grad, dense
    return {"impl": impl, "dtype": dtype_name, "N": rows, "C": classes, "K": k,
            "median_ms": timing.median_s * 1e3, "reps": timing.reps,
            "peak_extra_fp32_buffers": (peak - before) / (rows * classes * 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1024x131072")
    parser.add_argument("--ks", default="32,256")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        impl, dtype_name, rows, classes, k = args.child
        print(json.dumps(_child(impl, dtype_name, int(rows), int(classes), int(k))))
        return 0
    print("| impl | dtype | N | C | K | ms | × topk_moekd time | peak extra (N×C fp32 buffers) |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        rows, classes = (int(v) for v in shape.split("x"))
        for k in (int(v) for v in args.ks.split(",")):
            for dtype_name in args.dtypes.split(","):
                base = None
                for impl in args.impls.split(","):
                    out = subprocess.run([sys.executable, __file__, "--child", impl, dtype_name, str(rows),
                                          str(classes), str(k)], capture_output=True, text=True, check=True)
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    base = base or r["median_ms"]
                    print(f"| {impl} | {dtype_name} | {rows} | {classes} | {k} | {r['median_ms']:.1f} | "
                          f"{r['median_ms'] / base:.2f} | {r['peak_extra_fp32_buffers']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
