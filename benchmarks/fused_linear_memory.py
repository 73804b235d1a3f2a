"""Peak extra host memory (and time) of one fwd+bwd through the LM head, fused-linear vs
materialised logits, each implementation in a fresh process.

    python benchmarks/fused_linear_memory.py --shape 4096x65536x512 --dtypes fp32,bf16

Implementations (all: the student's hidden states (N, H) and head weight (V, H) get a
gradient; the teacher's (N, H) and (V, H) do not; default MoE-KD options, mean):

- ``materialised``: ``h @ W.T`` and the teacher's logits, then ``fused_moe_kd_loss``;
- ``fused_linear``: ``fused_linear_moe_kd_loss`` (automatic chunk size unless ``--chunk-size``);
- ``compiled_plain``: ``torch.compile`` of the plain-PyTorch MoE-KD on materialised logits
  (``moekd_kernels.benchmarking.eager_moekd``), the head's GEMMs inside the compiled function.

"Extra" is the peak RSS during one fwd+bwd minus the RSS just before it. The step is run
once first at the same shape (imports, JIT build, compilation; ``--warmup-rows`` runs it
on fewer rows instead, where nothing is shape-specialised), then freed memory is given
back to the OS (``malloc_trim``) and the high-water mark (VmHWM) reset through
/proc/self/clear_refs (Linux), so buffers the warm-up left in the allocator's free lists
cannot hide the measured step's own. The gradients the step returns count: they are what
the caller asked for. Reported in bytes and in units of one N×V float32 buffer.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
IMPLS = ("materialised", "fused_linear", "compiled_plain")


def make_inputs(rows: int, vocab: int, hidden: int, dtype, seed: int = 0):
    """Student and teacher hidden states (N, H) and head weights (V, H), logits of scale ~3."""
    import torch

    g = torch.Generator().manual_seed(seed)
    scale = 3.0 / hidden ** 0.5
    h_s = torch.randn(rows, hidden, generator=g).to(dtype)
    w_s = (scale * torch.randn(vocab, hidden, generator=g)).to(dtype)
    h_t = torch.randn(rows, hidden, generator=g).to(dtype)
    w_t = (scale * torch.randn(vocab, hidden, generator=g)).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=g)
    return h_s, w_s, h_t, w_t, target


_compiled_plain = None


def _plain_moekd(h_s, w_s, h_t, w_t, target):
    import torch

    from moekd_kernels.benchmarking import eager_moekd

    with torch.no_grad():
        teacher = h_t @ w_t.T
    return eager_moekd(h_s @ w_s.T, teacher, target)


def make_step(impl: str, h_s, w_s, h_t, w_t, target, *, chunk_size=None, backend: str = "auto"):
    """One training step's loss work: the loss, then the gradients w.r.t. h_s and w_s."""
    import torch

    from moekd_kernels import fused_linear_moe_kd_loss, fused_moe_kd_loss

    global _compiled_plain
    h_leaf = h_s.detach().requires_grad_(True)
    w_leaf = w_s.detach().requires_grad_(True)
    if impl == "materialised":
        def loss_fn():
            with torch.no_grad():
                teacher = h_t @ w_t.T
            return fused_moe_kd_loss(h_leaf @ w_leaf.T, teacher, target, backend=backend)
    elif impl == "fused_linear":
        def loss_fn():
            return fused_linear_moe_kd_loss(h_leaf, w_leaf, h_t, w_t, target, chunk_size=chunk_size,
                                            backend=backend)
    elif impl == "compiled_plain":
        if _compiled_plain is None:
            _compiled_plain = torch.compile(_plain_moekd, dynamic=False)

        def loss_fn():
            return _compiled_plain(h_leaf, w_leaf, h_t, w_t, target)
    else:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")

    def step():
        return torch.autograd.grad(loss_fn(), (h_leaf, w_leaf))

    return step


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


def _child(impl: str, dtype_name: str, rows: int, vocab: int, hidden: int, chunk_size, backend: str,
           time_reps: int, warmup_rows: int) -> dict:
    import psutil
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from peak_memory import _vm_hwm_bytes

    dtype = getattr(torch, DTYPES[dtype_name])
    inputs = make_inputs(rows, vocab, hidden, dtype)
    step = make_step(impl, *inputs, chunk_size=chunk_size, backend=backend)
    start = time.perf_counter()
    if warmup_rows and warmup_rows < rows:       # fewer rows: imports and JIT build only
        make_step(impl, *make_inputs(warmup_rows, vocab, hidden, dtype), chunk_size=chunk_size,
                  backend=backend)()
    else:
        step()                                   # warm-up: imports, JIT build, compile
    first_s = time.perf_counter() - start
    _release_free_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                             # reset VmHWM to the current RSS
    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    grads = step()
    times = [time.perf_counter() - start]
    peak = _vm_hwm_bytes()
    del grads
    for _ in range(max(0, time_reps - 1)):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    buffer = rows * vocab * 4
    return {"impl": impl, "dtype": dtype_name, "N": rows, "V": vocab, "H": hidden,
            "chunk_size": chunk_size, "threads": torch.get_num_threads(),
            "peak_extra_bytes": peak - before, "fp32_NxV_buffers": (peak - before) / buffer,
            "warmup_s": first_s, "median_s": statistics.median(times), "reps": len(times)}


def measure(impl: str, dtype_name: str, rows: int, vocab: int, hidden: int, *, chunk_size=None,
            backend: str = "auto", time_reps: int = 1, warmup_rows: int = 0) -> dict:
    """Run one measurement in a fresh interpreter and return its result."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, str(Path(__file__).resolve()), "--child", impl, dtype_name, str(rows),
            str(vocab), str(hidden), str(chunk_size or 0), backend, str(time_reps), str(warmup_rows)]
    out = subprocess.run(args, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} {dtype_name} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x65536x512", help="NxVxH")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--chunk-size", type=int, default=0, help="0: automatic")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--time-reps", type=int, default=3, help="timed steps after the measured one")
    parser.add_argument("--warmup-rows", type=int, default=0,
                        help="warm up on this many rows (0: the full shape; compiled_plain needs that)")
    parser.add_argument("--child", nargs=9, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        impl, dtype_name, rows, vocab, hidden, chunk, backend, reps, warmup = args.child
        print(json.dumps(_child(impl, dtype_name, int(rows), int(vocab), int(hidden), int(chunk) or None,
                                backend, int(reps), int(warmup))))
        return 0
    rows, vocab, hidden = (int(v) for v in args.shape.split("x"))
    print("| dtype | N | V | H | implementation | peak extra MiB | × one N×V fp32 buffer | "
          "median s | warm-up s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes.split(","):
        for impl in args.impls.split(","):
            r = measure(impl, dtype_name, rows, vocab, hidden, chunk_size=args.chunk_size or None,
                        backend=args.backend, time_reps=args.time_reps, warmup_rows=args.warmup_rows)
            print(f"| {dtype_name} | {rows} | {vocab} | {hidden} | {impl} | "
                  f"{r['peak_extra_bytes'] / 2**20:.0f} | {r['fp32_NxV_buffers']:.3f} | "
                  f"{r['median_s']:.2f} | {r['warmup_s']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
