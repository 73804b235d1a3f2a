"""Peak extra host memory of one fwd+bwd on the CPU, each implementation in a fresh process.

    python benchmarks/peak_memory.py --shapes 1024x32768,256x131072 --dtypes fp32,bf16
    python benchmarks/peak_memory.py --no-grad --impls cpu,reference   # evaluation: forward under no_grad

"Extra" is the process's peak RSS during one fwd+bwd minus its RSS just before,
with the inputs built and one warm-up step already run at the same shape (imports,
JIT build, torch.compile), after which the kernel's high-water mark (VmHWM) is
reset through /proc/self/clear_refs (Linux). Reported in bytes and in units of
one N×C float32 buffer. The gradient the step leaves behind counts: it is what
the user asked for. With ``--no-grad`` the step is one forward under
``torch.no_grad()`` (a validation loop), which needs no N×C buffer at all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _child(impl: str, dtype_name: str, rows: int, classes: int, no_grad: bool = False) -> dict:
    import psutil
    import torch

    sys.path.insert(0, str(ROOT))
    from moekd_kernels import benchmarking

    dtype = getattr(torch, DTYPES[dtype_name])
    baselines = [b for b in benchmarking.BASELINES if b != "liger_classic_kd"]
    impls = {i.name: i for i in benchmarking.implementations("cpu", baselines=baselines)}
    g = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(rows, classes, generator=g)).to(dtype)
    teacher = (3 * torch.randn(rows, classes, generator=g)).to(dtype)
    target = torch.randint(0, classes, (rows,), generator=g)
    if no_grad:
        loss_fn, options = impls[impl].loss_fn, dict(benchmarking.DEFAULT_OPTIONS)

        def step():
            with torch.no_grad():
                return loss_fn(student, teacher, target, **options)
    else:
        step = benchmarking.make_step(impls[impl].loss_fn, student, teacher, target)
    step()                                       # warm-up: imports, JIT build, compile
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                             # reset VmHWM to the current RSS
    before = psutil.Process().memory_info().rss
    grad = step()
    peak = _vm_hwm_bytes()
    del grad
    buffer = rows * classes * 4
    return {"impl": impl, "dtype": dtype_name, "N": rows, "C": classes, "no_grad": no_grad,
            "peak_extra_bytes": peak - before, "fp32_buffers": (peak - before) / buffer}


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(impl: str, dtype_name: str, rows: int, classes: int, no_grad: bool = False) -> dict:
    """Run one measurement in a fresh interpreter and return its result."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, __file__, "--child", impl, dtype_name, str(rows), str(classes),
         "no_grad" if no_grad else "grad"],
        capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"peak_memory child for {impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1024x32768")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--impls", default="cpu,compiled_moekd,eager_moekd,eager_classic_kd")
    parser.add_argument("--no-grad", action="store_true",
                        help="measure a forward under torch.no_grad() instead of fwd+bwd")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        impl, dtype_name, rows, classes, mode = args.child
        print(json.dumps(_child(impl, dtype_name, int(rows), int(classes), mode == "no_grad")))
        return 0
    if args.no_grad:
        print("Forward only, under torch.no_grad().\n")
    print("| dtype | N | C | implementation | peak extra MiB | × one N×C fp32 buffer |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        rows, classes = (int(v) for v in shape.split("x"))
        for dtype_name in args.dtypes.split(","):
            for impl in args.impls.split(","):
                r = measure(impl, dtype_name, rows, classes, no_grad=args.no_grad)
                print(f"| {dtype_name} | {rows} | {classes} | {impl} | "
                      f"{r['peak_extra_bytes'] / 2**20:.0f} | {r['fp32_buffers']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
