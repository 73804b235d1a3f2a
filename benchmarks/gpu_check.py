"""One command for a lent GPU: correctness, speed, bandwidth and memory of every backend.

    python benchmarks/gpu_check.py                  # full check, ~5 min on an H100
    python benchmarks/gpu_check.py --quick          # fewer shapes and cases
    python benchmarks/gpu_check.py --sweep          # also sweep the launch configs
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --tiny   # CPU smoke test (the tests run this)

Sections, each case guarded so that one failure is logged and the rest still runs:

1. environment: card, driver, versions, which backends are usable (and why not);
2. correctness of each backend on the device against float64 computed on the CPU by
   ``moekd_kernels.reference`` (itself held to the naive float64 oracle by the tests):
   fp32/bf16/fp16, C up to 262144, L = 1 and 3, ignored rows, a few dozen rows per case;
3. device-to-device copy bandwidth (bytes read + written);
4. a breakdown of one fused step: forward alone, forward + backward (grad_output 1,
   when backward has nothing to scale, and 2), and backward's scaling pass alone (this
   package's kernel against PyTorch's ``mul_``);
5. with ``--sweep``, before the timing: a sweep of the launch settings of the backends in
   ``SWEEP_SPACES`` (below), one forced config at a time, each checked against the default's
   loss and gradient: Triton's ``launch_config(num_classes, num_levels, device_type)``, which
   its ``forward`` looks up as a module global (replaced meanwhile), and the CUDA backend's
   ``FORCE_PATH``/``PREFETCH`` (set meanwhile). A backend whose winner is not its default is
   then also timed with the winner, as "<backend>*";
6. vocab-parallel in a one-process group (NCCL on a GPU, gloo with ``--tiny``): every
   backend with phase functions, ``fused_moe_kd_loss(..., process_group=)`` against the
   float64 rows, and ``fused_linear_moe_kd_loss(..., process_group=)`` against the
   unsharded fused linear call; its fwd+bwd time against the unsharded fused call;
7. fwd+bwd timing with CUDA events at N=16384, C ∈ {4096, 32768, 131072, 262144}, bf16
   and fp32: the backends against eager_moekd, compiled_moekd, eager_classic_kd and Liger's
   classic KD when ``liger_kernel`` imports; GB/s, % of copy bandwidth, peak memory.

Output goes to the console as it happens and to ``--out`` (default ``$OUT``, else
./gpu_check_out): gpu_check.log (everything), gpu_check.json (all results, rewritten after
each case, so a killed run keeps what it measured) and gpu_check.md (the final tables).
Past ``--budget-s`` seconds of wall time, the remaining timing and sweep cases are
skipped and listed. Exit status 1 when a correctness check fails or a section errors.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Candidates for --sweep, per backend (tuples, or prefixes of the default's tuple).
# triton (block, num_warps): the blocks and warps around the launch table's choices.
# cuda (path, prefetch): each row mapping, with and without the prefetch; a forced
# path that cannot run a shape raises (the sweep logs it).
SWEEP_SPACES = {
    "triton": [(1024, 4), (1024, 8), (2048, 8), (4096, 4), (4096, 8), (4096, 16), (8192, 16)],
    "cuda": [("auto", 1), ("auto", 0), ("cluster", 1), ("cluster", 0), ("block", 1), ("block", 0),
             ("stream", 0)],
}
# The module attributes a cuda config sets, in order.
_CUDA_KNOBS = ("FORCE_PATH", "PREFETCH")
# The options used by correctness cases with several levels: unequal everything.
LEVEL3_OPTIONS = {"temperature": [1.0, 2.0, 4.0], "expert_strength": [0.5, 2.0, 8.0],
                  "level_weights": [1.0, 2.0, 3.0], "gate_weight": 0.7, "expert_weight": 1.3}
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                   help="folder for gpu_check.log/.json/.md (default $OUT, else ./gpu_check_out)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer correctness cases and shapes")
    mode.add_argument("--tiny", action="store_true",
                      help="CPU, tiny sizes, Triton under its interpreter: checks the script itself")
    p.add_argument("--sweep", action="store_true", help="also sweep the backends' launch configs")
    p.add_argument("--sweep-only", action="store_true", help="environment, bandwidth and the sweep only")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="wall-clock seconds after which timing/sweep cases are skipped (default 330)")
    p.add_argument("--device", default=None, help="default cuda (cpu with --tiny)")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends to check (default: every usable one)")
    p.add_argument("--dtypes", default=None, help="timing dtypes (default bf16,fp32)")
    p.add_argument("--shapes", default=None, help="timing shapes NxC[xL],... (default: the GPU table)")
    p.add_argument("--no-compile", action="store_true", help="leave out compiled_moekd")
    p.add_argument("--no-liger", action="store_true", help="leave out Liger's classic KD")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--time-per-case", type=float, default=0.3,
                   help="seconds of timed calls per timing case (default 0.3)")
    return p.parse_args(argv)


class Report:
    """Console + log file + a JSON of everything so far, all written as they come."""

    def __init__(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        self.start = time.perf_counter()
        self.log_file = open(os.path.join(out_dir, "gpu_check.log"), "w", encoding="utf-8", buffering=1)
        self.data = {"env": {}, "backends": {}, "copy_gbps": None, "correctness": [], "timing": [],
                     "sweep": [], "skipped": [], "errors": []}

    def elapsed(self):
        return time.perf_counter() - self.start

    def log(self, msg=""):
        line = f"[{self.elapsed():6.1f}s] {msg}" if msg else ""
        print(line, flush=True)
        self.log_file.write(line + "\n")

    def error(self, where, exc):
        self.log(f"ERROR in {where}: {type(exc).__name__}: {exc}")
        tb = traceback.format_exc()
        self.log_file.write(tb + "\n")
        self.data["errors"].append({"where": where, "error": f"{type(exc).__name__}: {exc}"})
        self.save()

    def save(self):
        path = os.path.join(self.out_dir, "gpu_check.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(path + ".tmp", path)


def _device_poisoned(exc) -> bool:
    """A sticky CUDA error: every later CUDA call in this process fails too."""
    text = str(exc).lower()
    return any(k in text for k in ("illegal memory access", "device-side assert", "unspecified launch failure",
                                   "misaligned address", "illegal instruction"))


def section_env(rep, torch, device):
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": str(device),
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        env["triton"] = f"not importable: {exc}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sm_count=props.multi_processor_count,
                   gpu_memory_gb=round(props.total_memory / 1e9, 1),
                   capability=f"{props.major}.{props.minor}")
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as exc:  # noqa: BLE001
            env["nvidia_smi"] = f"unavailable: {exc}"
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT,
                                           capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - a copied tree may have no .git
        env["git_commit"] = ""
    rep.data["env"] = env
    for k, v in env.items():
        rep.log(f"env {k}: {v}")
    rep.save()


def section_backends(rep, device_type, wanted, tiny):
    """Which backends are usable here, and the reason for each that is not (JIT builds run here)."""
    from moekd_kernels.backends import BACKENDS

    usable = []
    for name, backend in BACKENDS.items():
        t0 = time.perf_counter()
        try:
            reason = backend.unavailable_reason(device_type)
        except Exception as exc:  # noqa: BLE001
            reason = f"availability check raised {type(exc).__name__}: {exc}"
        took = time.perf_counter() - t0
        rep.data["backends"][name] = {"usable": reason is None, "reason": reason, "check_s": round(took, 2)}
        rep.log(f"backend {name}: {'usable' if reason is None else 'NOT usable: ' + reason} "
                f"(checked in {took:.1f} s)")
        if reason is None and (wanted is None or name in wanted):
            usable.append(name)
    if wanted:
        missing = [b for b in wanted if b not in usable]
        if missing:
            rep.error("backends", RuntimeError(f"requested backends not usable: {missing}"))
    rep.save()
    return usable


def correctness_cases(quick, tiny):
    """(dtype name, C, L, rows, extra) for the correctness section."""
    if tiny:
        return [(d, c, lv, 6, {}) for d in ("fp32", "bf16") for c in (1, 300) for lv in (1, 3)] + \
               [("bf16", 77, 2, 6, {"teacher_dtype": "fp32", "strided": True})]
    classes = (4097, 262144) if quick else (127, 4097, 131073, 262144)
    dtypes = ("fp32", "bf16") if quick else ("fp32", "bf16", "fp16")
    # 32 rows, 16 past 64k classes: the float64 oracle runs on the host's CPU cores.
    cases = [(d, c, lv, 32 if c <= 65536 else 16, {}) for d in dtypes for c in classes for lv in (1, 3)]
    # Mixed precisions and a row stride (a slice of a wider buffer), as trainers pass them.
    cases.append(("bf16", 32768, 2, 32, {"teacher_dtype": "fp32", "strided": True}))
    cases.append(("fp16", 50257, 1, 32, {"teacher_dtype": "bf16", "strided": True}))
    return cases


def section_correctness(rep, torch, B, device, backends, quick, tiny):
    from moekd_kernels import fused_moe_kd_loss
    from moekd_kernels.options import resolve_options
    from moekd_kernels.reference import reference_forward

    rep.log(f"== correctness vs float64 (reference on the CPU), backends {backends}")
    for dtype_name, classes, levels, rows, extra in correctness_cases(quick, tiny):
        label = f"{dtype_name} C={classes} L={levels} N={rows}" + \
            (f" teacher={extra['teacher_dtype']}" if "teacher_dtype" in extra else "") + \
            (" strided" if extra.get("strided") else "")
        try:
            dtype = B.DTYPES[dtype_name]
            teacher_dtype = B.DTYPES[extra.get("teacher_dtype", dtype_name)]
            options = dict(LEVEL3_OPTIONS) if levels == 3 else dict(B.DEFAULT_OPTIONS)
            if levels not in (1, 3):
                options = {k: (v if not isinstance(v, list) else v[:levels]) for k, v in LEVEL3_OPTIONS.items()}
            shape = B.Shape(rows, classes, levels)
            s, t, y = B.make_inputs(shape, dtype, "cpu", teacher_dtype=teacher_dtype, seed=classes + levels,
                                    ignore_frac=0.2)
            y[0] = 0                     # the first and last classes as labels (edge reads)
            y[-1] = classes - 1 if rows > 2 else y[-1]
            opts = resolve_options(levels, ignore_index=-100, **{
                "temperature": options["temperature"], "expert_strength": options["expert_strength"],
                "level_weights": options.get("level_weights"), "gate_weight": options["gate_weight"],
                "expert_weight": options["expert_weight"]})
            t0 = time.perf_counter()
            exp_loss, exp_ll, exp_agree, exp_grad = reference_forward(s.double(), t.double(), y, opts)
            oracle_s = time.perf_counter() - t0
            grad_out = torch.rand(rows, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) + 0.5
            exp_grad = exp_grad * grad_out[:, None]
        except Exception as exc:  # noqa: BLE001
            rep.error(f"correctness oracle {label}", exc)
            continue
        for backend in backends:
            where = f"correctness {backend} {label}"
            try:
                s_dev = s.to(device)
                if extra.get("strided"):
                    wide = torch.zeros(rows, classes + 64, dtype=dtype, device=device)
                    wide[:, 16:16 + classes] = s_dev
                    s_dev = wide[:, 16:16 + classes]      # row stride C + 64, offset 16
                leaf = s_dev.detach().requires_grad_(True)
                t_dev = t.to(device)
                loss, stats = fused_moe_kd_loss(leaf, t_dev if levels > 1 else t_dev[0], y.to(device),
                                                reduction="none", backend=backend, return_stats=True,
                                                **options)
                loss.backward(grad_out.to(device, loss.dtype))
                errs = {
                    "loss": B.rel_err(loss, exp_loss),
                    "grad": B.rel_err(leaf.grad, exp_grad),
                    "log_likelihood": B.rel_err(stats.log_likelihood, exp_ll),
                    "agreement": B.rel_err(stats.agreement, exp_agree),
                }
                tol = B.TOLERANCE[B.DTYPES[dtype_name]]   # shared with tests/oracle.py
                ok = all(e <= tol for e in errs.values()) and leaf.grad.dtype == dtype
                rep.data["correctness"].append({"backend": backend, "dtype": dtype_name, "classes": classes,
                                                "levels": levels, "rows": rows, **extra, "tol": tol,
                                                "ok": ok, "grad_dtype": str(leaf.grad.dtype), **errs})
                worst = max(errs, key=errs.get)
                rep.log(f"{'ok  ' if ok else 'FAIL'} {backend:9s} {label}: worst {worst} rel err "
                        f"{errs[worst]:.2e} (tol {tol:g}; oracle {oracle_s:.1f} s)")
            except Exception as exc:  # noqa: BLE001
                rep.data["correctness"].append({"backend": backend, "dtype": dtype_name, "classes": classes,
                                                "levels": levels, "rows": rows, **extra, "ok": False,
                                                "error": f"{type(exc).__name__}: {exc}"})
                rep.error(where, exc)
                if _device_poisoned(exc):
                    raise
            rep.save()


@contextlib.contextmanager
def one_process_group(torch, device):
    """WORLD of a one-process group: NCCL on a GPU, gloo on the CPU."""
    import tempfile

    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.group.WORLD
        return
    store = os.path.join(tempfile.mkdtemp(prefix="gpu-check-pg-"), "store")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _record_check(rep, label, row, errs, tol, ok=True):
    """A correctness row compared with ``tol``, logged with its worst error."""
    ok = ok and all(e <= tol for e in errs.values())
    rep.data["correctness"].append({**row, "tol": tol, "ok": ok, **errs})
    worst = max(errs, key=errs.get)
    rep.log(f"{'ok  ' if ok else 'FAIL'} {label}: worst {worst} rel err {errs[worst]:.2e} (tol {tol:g})")


def section_vocab_parallel(rep, torch, B, device, tiny):
    from moekd_kernels import MoEKDStats, fused_linear_moe_kd_loss, fused_moe_kd_loss
    from moekd_kernels.backends import BACKENDS
    from moekd_kernels.options import resolve_options
    from moekd_kernels.reference import reference_forward

    backends = [n for n, b in BACKENDS.items() if b.phases is not None and b.unavailable_reason(device.type) is None]
    rep.log(f"== vocab-parallel (one-process group), backends {backends}")
    rows, classes = (6, 300) if tiny else (64, 131072)
    options = dict(B.DEFAULT_OPTIONS)
    opts = resolve_options(1, ignore_index=-100, **{k: options.get(k) for k in (
        "temperature", "expert_strength", "level_weights", "gate_weight", "expert_weight")})

    def stat_errors(loss, stats, want_loss, want_stats):
        return {"loss": B.rel_err(loss, want_loss),
                "log_likelihood": B.rel_err(stats.log_likelihood, want_stats.log_likelihood),
                "agreement": B.rel_err(stats.agreement, want_stats.agreement)}

    with one_process_group(torch, device) as group:
        for dtype_name in ("fp32", "bf16"):
            dtype = B.DTYPES[dtype_name]
            s, t, y = B.make_inputs(B.Shape(rows, classes, 1), dtype, "cpu", seed=3, ignore_frac=0.2)
            exp_loss, exp_ll, exp_agree, exp_grad = reference_forward(s.double(), t.double(), y, opts)
            for backend in backends:
                label = f"vocab-parallel {backend} {dtype_name} C={classes} N={rows}"
                row = {"backend": f"sharded:{backend}", "dtype": dtype_name, "classes": classes, "levels": 1,
                       "rows": rows}
                try:
                    leaf = s.to(device).detach().clone().requires_grad_(True)
                    loss, stats = fused_moe_kd_loss(leaf, t[0].to(device), y.to(device), reduction="none",
                                                    backend=backend, return_stats=True, process_group=group,
                                                    **options)
                    loss.sum().backward()
                    errs = stat_errors(loss, stats, exp_loss, MoEKDStats(exp_ll, exp_agree))
                    errs["grad"] = B.rel_err(leaf.grad, exp_grad)
                    _record_check(rep, label, row, errs, B.TOLERANCE[dtype], leaf.grad.dtype == dtype)
                except Exception as exc:  # noqa: BLE001
                    rep.data["correctness"].append({**row, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
                    rep.error(label, exc)
                    if _device_poisoned(exc):
                        raise
                rep.save()
        for backend in backends:
            label = f"vocab-parallel fused linear {backend}, vs the unsharded call"
            with guarded(rep, label):
                g = torch.Generator().manual_seed(4)
                hidden = torch.randn(rows, 64, generator=g).to(device)
                weight = (torch.randn(classes, 64, generator=g) / 8).to(device)
                teacher_hidden = torch.randn(rows, 32, generator=g).to(device)
                teacher_weight = (torch.randn(classes, 32, generator=g) / 6).to(device)
                target = y.to(device)
                results = []
                for pg in (None, group):
                    leaves = (hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True))
                    loss, stats = fused_linear_moe_kd_loss(*leaves, teacher_hidden, teacher_weight, target,
                                                           backend=backend, process_group=pg, return_stats=True,
                                                           **options)
                    loss.backward()
                    results.append((loss, stats) + tuple(leaf.grad for leaf in leaves))
                (loss, stats, grad_hidden, grad_weight), want = results[1], results[0]
                errs = stat_errors(loss, stats, want[0], want[1])
                errs["grad"] = max(B.rel_err(grad_hidden, want[2]), B.rel_err(grad_weight, want[3]))
                _record_check(rep, label, {"backend": f"sharded-linear:{backend}", "dtype": "fp32",
                                           "classes": classes, "levels": 1, "rows": rows}, errs, 1e-5)
            rep.save()
        if not tiny:
            shape = B.Shape(16384, 131072, 1)
            s, t, y = B.make_inputs(shape, torch.bfloat16, device, seed=5, ignore_frac=0.1)
            # The fused call once, then each kernel's sharded call (the reference's phases hold
            # several N×C float32 temporaries).
            for backend, pg in [("auto", None)] + [(b, group) for b in backends if b != "reference"]:
                where = f"vocab-parallel timing {backend} {'sharded' if pg is not None else 'fused'}"
                with guarded(rep, where):
                    leaf = s.detach().requires_grad_(True)

                    def step():
                        leaf.grad = None
                        fused_moe_kd_loss(leaf, t[0], y, backend=backend, process_group=pg, **options).backward()

                    timing = B.time_fn(step, device, warmup=2, min_reps=5, max_reps=10)
                    rep.data.setdefault("vocab_parallel_timing", []).append(
                        {"backend": backend, "sharded": pg is not None, "ms": timing.median_s * 1e3,
                         "shape": str(shape), "dtype": "bf16"})
                    rep.log(f"{where}: {timing.median_s * 1e3:.2f} ms (N=16384, C=131072, bf16)")
                rep.save()


def timing_plan(args, B):
    if args.shapes:
        shapes = B.parse_shapes(args.shapes)
    elif args.tiny:
        shapes = (B.Shape(8, 64),)
    elif args.quick:
        shapes = B.QUICK_GPU_SHAPES
    else:
        shapes = B.GPU_SHAPES
    dtypes = args.dtypes.split(",") if args.dtypes else (["fp32"] if args.tiny else ["bf16", "fp32"])
    # The headline case (C=131072) first, so that a run cut short still has it.
    order = {131072: 0, 32768: 1, 262144: 2, 4096: 3}
    plan = [(d, s) for d in dtypes for s in sorted(shapes, key=lambda s: (order.get(s.classes, 9), s.classes))]
    return plan


def _sweepable(backend, module) -> bool:
    return backend in SWEEP_SPACES and (callable(getattr(module, "launch_config", None))
                                        or all(hasattr(module, k) for k in _CUDA_KNOBS))


def default_config(module, shape, device_type) -> tuple:
    """The launch settings the backend module picks for this shape."""
    if callable(getattr(module, "launch_config", None)):
        return tuple(module.launch_config(shape.classes, shape.levels, device_type))
    return tuple(getattr(module, k) for k in _CUDA_KNOBS)


def _launch_config_note(device_type, backend, shape):
    """The launch settings for this shape, when the backend has any to sweep."""
    try:
        from moekd_kernels.backends import BACKENDS

        module = BACKENDS[backend].load()
        if _sweepable(backend, module):
            return f"config {default_config(module, shape, device_type)}"
    except Exception:  # noqa: BLE001 - a note only
        pass
    return ""


def section_baseline_checks(rep, torch, B, device):
    """Liger's classic KD must compute what eager_classic_kd computes, or its timing means
    nothing. Checked here, on the device: its KL kernel does not run under the interpreter."""
    if B.liger_unavailable_reason() is not None:
        return
    shape = B.Shape(64, 4096)
    # No ignored rows: Liger's KL has no ignore_index (the timed inputs have none either).
    s, t, y = B.make_inputs(shape, torch.float32, device, seed=5)
    losses, grads = [], []
    for fn in (B.eager_classic_kd, B.make_liger_classic_kd()):
        leaf = s.clone().requires_grad_(True)   # Liger overwrites its input: a fresh copy each
        loss = fn(leaf, t, y, **B.DEFAULT_OPTIONS)
        (grad,) = torch.autograd.grad(loss, leaf)
        losses.append(loss.detach())
        grads.append(grad)
    errs = {"loss": B.rel_err(losses[1], losses[0]), "grad": B.rel_err(grads[1], grads[0])}
    ok = all(e <= 1e-4 for e in errs.values())
    rep.data["baseline_checks"] = {"liger_classic_kd_vs_eager_classic_kd": {**errs, "ok": ok}}
    rep.log(f"{'ok  ' if ok else 'FAIL'} liger_classic_kd vs eager_classic_kd (fp32 {shape.label}, "
            f"no ignored rows): loss rel err {errs['loss']:.1e}, grad rel err {errs['grad']:.1e}")
    if not ok:
        rep.error("baseline check", RuntimeError("liger_classic_kd does not match eager_classic_kd"))


def section_timing(rep, torch, B, device, backends, args, copy_gbps, winners=None):
    """fwd+bwd of every implementation per (dtype, shape). A backend whose sweep winner
    differs from its default launch is timed again with the winner, as "<backend>*"."""
    baselines = [b for b in B.BASELINES
                 if not (args.no_compile and b == "compiled_moekd")
                 and not (args.no_liger and b == "liger_classic_kd")]
    from moekd_kernels.backends import BACKENDS

    impls = B.implementations(device.type, backends=backends, baselines=baselines, log=rep.log)
    rep.log(f"== fwd+bwd timing: {[i.name for i in impls]}")
    results = []
    for dtype_name, shape in timing_plan(args, B):
        dtype = B.DTYPES[dtype_name]
        inputs = None
        runs = []
        for impl in impls:
            runs.append((impl, None))
            module = BACKENDS[impl.name].load() if impl.is_backend and winners else None
            if module is not None and _sweepable(impl.name, module):
                tuned = swept_config(winners, impl.name, shape)
                default = default_config(module, shape, device.type)
                if tuned is not None and tuple(tuned) != default:
                    runs.append((B.Impl(impl.name + "*", impl.loss_fn, True), (module, tuned)))
        for impl, forced in runs:
            where = f"timing {impl.name} {dtype_name} {shape.label}"
            if rep.elapsed() > args.budget_s:
                rep.data["skipped"].append(where)
                rep.log(f"skip (past the {args.budget_s:.0f} s budget): {where}")
                continue
            try:
                if inputs is None:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    inputs = B.make_inputs(shape, dtype, device)
                with (forced_launch_config(*forced) if forced else contextlib.nullcontext()):
                    result = B.measure_impl(
                        impl, shape, dtype, device, target_s=args.time_per_case, min_rows=256, log=rep.log,
                        inputs=None if impl.name == "liger_classic_kd" else inputs,
                        memory=device.type == "cuda", min_reps=2 if args.tiny else 5)
                if impl.is_backend:
                    note = (f"swept config {tuple(forced[1])}" if forced
                            else _launch_config_note(device.type, impl.name, shape))
                    result.note = "; ".join(n for n in (result.note, note) if n)
                results.append(result)
                row = result.as_dict()
                if copy_gbps:
                    row["pct_copy"] = round(100 * result.gbps / copy_gbps, 1)
                row.update({f"x_{k}": round(v, 3) for k, v in
                            B.speedups(results).get((impl.name, result.key), {}).items()})
                rep.data["timing"].append(row)
                pct = f", {100 * result.gbps / copy_gbps:.0f}% of copy" if copy_gbps else ""
                mem = f", peak +{result.peak_extra_gb:.2f} GB" if result.peak_extra_gb is not None else ""
                comp = f", compile {result.compile_s:.1f} s" if result.compile_s is not None else ""
                rep.log(f"{where}: {result.median_ms:.3f} ms, {B.format_gbps(result.gbps)} GB/s{pct}{mem}{comp}"
                        f"{' (' + result.note + ')' if result.note else ''}")
            except Exception as exc:  # noqa: BLE001
                rep.error(where, exc)
                if _device_poisoned(exc):
                    raise
            rep.save()
        inputs = None
    return results


def section_breakdown(rep, torch, B, device, backends, args):
    """Where a fused step's time goes: forward alone (the kernel, which also writes the
    gradient) against forward + backward, and backward's one N×C pass (scaling the saved
    gradient by grad_output) timed alone, both as this package does it and as PyTorch's
    ``mul_`` by a float32 0-dim tensor would."""
    from moekd_kernels import fused_moe_kd_loss

    if args.tiny:
        shapes, dtype_name = [B.Shape(8, 64)], "fp32"
    else:
        shapes, dtype_name = [B.Shape(16384, 131072), B.Shape(16384, 32768)], "bf16"
    dtype = B.DTYPES[dtype_name]
    rows = []
    rep.log(f"== breakdown of a fused step ({dtype_name}): {backends}")
    for shape in shapes:
        if rep.elapsed() > args.budget_s:
            rep.data["skipped"].append(f"breakdown {shape.label}")
            continue
        student, teacher, target = B.make_inputs(shape, dtype, device)
        num_bytes = B.moekd_bytes(shape.rows, shape.classes, shape.levels, dtype, teacher.dtype)
        grad_bytes = 2 * shape.rows * shape.classes * student.element_size()  # read + write
        leaf = student.detach().requires_grad_(True)
        shape_rows = []
        for backend in backends:
            def forward_only(backend=backend):
                return fused_moe_kd_loss(leaf, teacher, target, backend=backend, **B.DEFAULT_OPTIONS)
            t_fwd = B.time_fn(forward_only, device, warmup=2, target_s=0.2).median_s
            loss_fn = B.package_loss(backend)
            t_step = B.time_fn(B.make_step(loss_fn, student, teacher, target), device,
                               warmup=2, target_s=0.2).median_s
            # grad_output 2 (a weighted loss, a GradScaler): backward's scaling pass runs.
            t_step2 = B.time_fn(B.make_step(lambda *a, **k: 2.0 * loss_fn(*a, **k), student, teacher, target),
                                device, warmup=2, target_s=0.2).median_s
            row = {"backend": backend, "rows": shape.rows, "classes": shape.classes, "dtype": dtype_name,
                   "forward_ms": t_fwd * 1e3, "step_ms": t_step * 1e3, "step_grad_output_2_ms": t_step2 * 1e3,
                   "forward_gbps": B.gb_per_s(num_bytes, t_fwd)}
            if backend == "cuda":
                try:
                    from moekd_kernels import cuda_backend
                    row["plan"] = cuda_backend.describe_plan(shape.classes, shape.levels, dtype)
                except Exception as exc:  # noqa: BLE001 - a note only
                    row["plan"] = f"n/a ({exc})"
            shape_rows.append(row)
            rep.log(f"breakdown {backend} {dtype_name} {shape.label}: forward {t_fwd * 1e3:.3f} ms "
                    f"({B.format_gbps(row['forward_gbps'])} GB/s), forward+backward {t_step * 1e3:.3f} ms, "
                    f"with grad_output 2 {t_step2 * 1e3:.3f} ms"
                    + (f"; plan: {row['plan']}" if "plan" in row else ""))
        del leaf
        if "triton" in backends:
            from moekd_kernels.triton_backend import scale_rows_

            g = torch.randn(shape.rows, shape.classes, device=device).to(dtype)
            factor = torch.tensor(1 / 3, device=device)
            per_row = factor.expand(shape.rows)
            t_kernel = B.time_fn(lambda: scale_rows_(g, per_row), device, warmup=2, target_s=0.2).median_s
            t_torch = B.time_fn(lambda: g.mul_(factor), device, warmup=2, target_s=0.2).median_s
            ones = torch.ones((), device=device).expand(shape.rows)
            t_skip = B.time_fn(lambda: scale_rows_(g, ones), device, warmup=2, target_s=0.2).median_s
            sample = g[:4].clone()
            exact = (sample.float() * factor).to(dtype)
            torch_result = sample.clone().mul_(factor)
            mismatch = int((torch_result != exact).sum())
            row = {"backend": "backward scale pass", "rows": shape.rows, "classes": shape.classes,
                   "dtype": dtype_name, "scale_rows_ms": t_kernel * 1e3, "torch_mul_ms": t_torch * 1e3,
                   "scale_rows_factor_1_ms": t_skip * 1e3,
                   "scale_rows_gbps": B.gb_per_s(grad_bytes, t_kernel),
                   "torch_mul_gbps": B.gb_per_s(grad_bytes, t_torch),
                   "torch_mul_mismatches_vs_float32_factor": f"{mismatch}/{sample.numel()}"}
            shape_rows.append(row)
            rep.log(f"breakdown scale pass {dtype_name} {shape.label}: scale_rows_ {t_kernel * 1e3:.3f} ms "
                    f"({B.format_gbps(row['scale_rows_gbps'])} GB/s), torch mul_ {t_torch * 1e3:.3f} ms "
                    f"({B.format_gbps(row['torch_mul_gbps'])} GB/s), scale_rows_ by 1 (skipped) "
                    f"{t_skip * 1e3:.3f} ms; torch mul_ differs from the float32-factor "
                    f"product in {mismatch}/{sample.numel()} elements")
            del g
        student = teacher = target = None
        rows += shape_rows
        rep.data.setdefault("breakdown", []).extend(shape_rows)
        rep.save()
    return rows


@contextlib.contextmanager
def forced_launch_config(module, config):
    """The backend module launches with ``config`` for every shape meanwhile: its
    ``launch_config`` returns it (``forward`` looks the function up as a module global on
    each call), or, for the cuda backend, its FORCE_PATH and PREFETCH hold it."""
    if callable(getattr(module, "launch_config", None)):
        names, values = ("launch_config",), (lambda num_classes, num_levels, device_type: tuple(config),)
    else:
        names, values = _CUDA_KNOBS, tuple(config)
    original = [getattr(module, n) for n in names]
    for name, value in zip(names, values):
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in zip(names, original):
            setattr(module, name, value)


def _loss_and_grad(torch, backend, inputs):
    """The mean loss and its gradient through the public API (the timed path: same compiles)."""
    from moekd_kernels import fused_moe_kd_loss
    from moekd_kernels.benchmarking import DEFAULT_OPTIONS

    student, teacher, target = inputs
    leaf = student.detach().requires_grad_(True)
    loss = fused_moe_kd_loss(leaf, teacher, target, backend=backend, **DEFAULT_OPTIONS)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def _device_rel_err(torch, actual, expected, chunks=16):
    """‖actual − expected‖ / ‖expected‖ in float32 on the device, a block of rows at a time
    (no full-size float64 copies of a multi-GB gradient)."""
    num, den = 0.0, 0.0
    actual = actual.reshape(-1, actual.shape[-1] if actual.dim() else 1)
    expected = expected.reshape(actual.shape)
    for a, e in zip(actual.chunk(chunks), expected.chunk(chunks)):
        a, e = a.float(), e.float()
        if not torch.equal(torch.isfinite(a), torch.isfinite(e)):
            return float("inf")
        ok = torch.isfinite(e)
        num += float(((a - e)[ok] ** 2).sum())
        den += float((e[ok] ** 2).sum())
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


# A swept config computes the same function as the default, up to summation order
# (and the gradient's own rounding in bf16).
SWEEP_TOLERANCE = {"loss": 1e-5, "grad": 1e-2}


def section_sweep(rep, torch, B, device, backends, args):
    """Time each backend in ``SWEEP_SPACES`` with every candidate config forced, after
    checking that the config computes what the default computes.

    Returns (rows, winners): winners maps (backend, C, L) to the fastest checked config.
    """
    from moekd_kernels.backends import BACKENDS

    if args.tiny:
        shapes, dtypes = [B.Shape(2, 40)], ["fp32"]
    else:
        shapes = [B.Shape(16384, 4096), B.Shape(16384, 32768), B.Shape(16384, 131072)]
        dtypes = ["bf16"]
    rows_out, winners = [], {}
    for backend in backends:
        module = BACKENDS[backend].load()
        if not _sweepable(backend, module):
            rep.log(f"sweep: backend {backend} has no launch settings to sweep")
            continue
        space = list(SWEEP_SPACES[backend])
        if backend == "triton" and args.tiny:   # one small forced block, under the interpreter
            space = [(16, 1)]
        impl = B.Impl(backend, B.package_loss(backend), True)
        rep.log(f"== sweep {backend}: {len(space)} configs × {len(shapes)} shapes × {dtypes}")
        for dtype_name in dtypes:
            dtype = B.DTYPES[dtype_name]
            for shape in shapes:
                default = default_config(module, shape, device.type)
                inputs = B.make_inputs(shape, dtype, device)
                # Triton's first entry is BLOCK: blocks past the row's size are the same single-block launch.
                cap = max(16, 1 << (shape.classes - 1).bit_length()) if backend == "triton" else None
                candidates = [c for c in space if tuple(c) != default[:len(c)] and not (cap and c[0] > cap)]
                expected = None
                best = None
                for config in [default] + candidates:
                    forced = tuple(config) + default[len(config):]
                    where = f"sweep {backend} {dtype_name} {shape.label} config={forced}"
                    if rep.elapsed() > args.budget_s:
                        rep.data["skipped"].append(where)
                        continue
                    try:
                        with forced_launch_config(module, forced):
                            loss, grad = _loss_and_grad(torch, backend, inputs)
                            if expected is None:
                                expected, errs = (loss, grad), {"loss": 0.0, "grad": 0.0}
                            else:
                                errs = {"loss": _device_rel_err(torch, loss, expected[0]),
                                        "grad": _device_rel_err(torch, grad, expected[1])}
                            del loss, grad
                            same = all(errs[k] <= SWEEP_TOLERANCE[k] for k in errs)
                            result = B.measure_impl(impl, shape, dtype, device, target_s=0.15, inputs=inputs,
                                                    memory=False, min_reps=2 if args.tiny else 5)
                        row = {"backend": backend, "dtype": dtype_name, "rows": shape.rows,
                               "classes": shape.classes, "levels": shape.levels, "config": list(forced),
                               "default": list(default), "is_default": forced == default,
                               "median_ms": result.median_ms, "gbps": result.gbps,
                               "loss_err_vs_default": errs["loss"], "grad_err_vs_default": errs["grad"],
                               "same_as_default": same}
                        rows_out.append(row)
                        rep.data["sweep"].append(row)
                        rep.log(f"{'' if same else 'FAIL '}{where}: {result.median_ms:.3f} ms, "
                                f"{B.format_gbps(result.gbps)} GB/s, vs default: loss {errs['loss']:.1e} "
                                f"grad {errs['grad']:.1e}{' (default)' if row['is_default'] else ''}")
                        if not same:
                            rep.error(where, RuntimeError(f"config {forced} disagrees with the default {default}"))
                        elif best is None or result.median_ms < best[1]:
                            best = (forced, result.median_ms)
                    except Exception as exc:  # noqa: BLE001 - e.g. too many registers for a config
                        rep.log(f"{where}: failed {type(exc).__name__}: {str(exc)[:200]}")
                        rep.data["sweep"].append({"backend": backend, "dtype": dtype_name,
                                                  "classes": shape.classes, "levels": shape.levels,
                                                  "config": list(forced), "error": str(exc)[:500]})
                        if _device_poisoned(exc):
                            raise
                    rep.save()
                if best is not None:
                    winners[(backend, shape.classes, shape.levels)] = best[0]
                inputs = expected = None
    return rows_out, winners


def swept_config(winners, backend, shape):
    """The sweep's winner for this shape, or for the largest swept C below it (same L)."""
    swept = sorted(c for (b, c, lv) in winners if b == backend and lv == shape.levels and c <= shape.classes)
    return winners[(backend, swept[-1], shape.levels)] if swept else None


def sweep_table(B, rows):
    lines = ["| backend | dtype | N | C | L | config | ms | GB/s | vs default |", "|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["backend"], r["dtype"], r["rows"], r["classes"], r["levels"]), []).append(r)
    for key, group in groups.items():
        default = next((r for r in group if r["is_default"]), None)
        best = sorted(group, key=lambda r: r["median_ms"])[:5]
        for r in best + ([default] if default and default not in best else []):
            vs = f"{default['median_ms'] / r['median_ms']:.2f}×" if default else "–"
            tag = " (default)" if r["is_default"] else ""
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {tuple(r['config'])}{tag} | "
                         f"{r['median_ms']:.3f} | {B.format_gbps(r['gbps'])} | {vs} |")
    return "\n".join(lines)


def breakdown_table(rows):
    lines = ["| what | dtype | N | C | forward ms | fwd+bwd ms | fwd+bwd ms, grad_output 2 | scale_rows_ ms | "
             "torch mul_ ms | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "step_ms" in r:
            lines.append(f"| {r['backend']} | {r['dtype']} | {r['rows']} | {r['classes']} | {r['forward_ms']:.3f} | "
                         f"{r['step_ms']:.3f} | {r['step_grad_output_2_ms']:.3f} | | | {r.get('plan', '')} |")
        else:
            lines.append(f"| {r['backend']} | {r['dtype']} | {r['rows']} | {r['classes']} | | | | "
                         f"{r['scale_rows_ms']:.3f} | {r['torch_mul_ms']:.3f} | scale_rows_ by 1: "
                         f"{r['scale_rows_factor_1_ms']:.3f} ms; mul_ differs from the float32 "
                         f"factor in {r['torch_mul_mismatches_vs_float32_factor']} |")
    return "\n".join(lines)


def correctness_table(rows):
    lines = ["| backend | dtype | C | L | N | loss | grad | log-lik | agreement | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tag = (f" (t {r['teacher_dtype']})" if "teacher_dtype" in r else "") + (" strided" if r.get("strided") else "")
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['dtype']}{tag} | {r['classes']} | {r['levels']} | {r['rows']} | "
                         f"error: {r['error'][:80]} | | | | FAIL |")
            continue
        lines.append(f"| {r['backend']} | {r['dtype']}{tag} | {r['classes']} | {r['levels']} | {r['rows']} | "
                     f"{r['loss']:.1e} | {r['grad']:.1e} | {r['log_likelihood']:.1e} | {r['agreement']:.1e} | "
                     f"{'ok' if r['ok'] else 'FAIL'} |")
    return "\n".join(lines)


def targets_summary(B, results, copy_gbps):
    """The project's GPU targets at bf16, C=131072 (issues 4 and 8)."""
    lines = []
    want = {"triton": 80.0, "cuda": 85.0}
    ratios = B.speedups(results)
    for r in results:
        base = r.impl.rstrip("*")
        if r.dtype != "bf16" or r.classes != 131072 or r.levels != 1 or base not in want:
            continue
        pct = 100 * r.gbps / copy_gbps if copy_gbps else float("nan")
        x_comp = ratios.get((r.impl, r.key), {}).get("compiled_moekd")
        ok_bw = pct >= want[base]
        ok_x = x_comp is not None and x_comp >= 1.5
        lines.append(f"- {r.impl}: {pct:.0f}% of copy bandwidth (target ≥ {want[base]:.0f}%: "
                     f"{'met' if ok_bw else 'MISSED'}), "
                     + (f"{x_comp:.2f}× compiled_moekd (target ≥ 1.5×: {'met' if ok_x else 'MISSED'})"
                        if x_comp is not None else "compiled_moekd not measured"))
    return "\n".join(lines)


@contextlib.contextmanager
def guarded(rep, where):
    """One section of the run: an error is logged and the run goes on, unless it left the
    device in an error state (then every later CUDA call fails too: stop)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - logged, counted in the exit status
        rep.error(where, exc)
        if _device_poisoned(exc):
            raise


def main(argv=None):
    args = parse_args(argv)
    if args.tiny:
        # Triton reads this at import: its kernels then run on CPU tensors.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    import torch

    from moekd_kernels import benchmarking as B

    rep = Report(args.out)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    rep.log(f"gpu_check: mode={'tiny' if args.tiny else 'quick' if args.quick else 'full'} "
            f"device={device} budget={args.budget_s:.0f} s out={os.path.abspath(args.out)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        rep.error("setup", RuntimeError("CUDA is not available (use --tiny for the CPU smoke test)"))
        return 1
    failed = False
    results, sweep_rows, copy_gbps = [], [], None
    try:
        section_env(rep, torch, device)
        wanted = None if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
        backends = section_backends(rep, device.type, wanted, args.tiny)
        if device.type == "cpu" and not args.tiny:
            backends = [b for b in backends if b not in B.INTERPRETED.get("cpu", ())]

        if not (args.skip_correctness or args.sweep_only):
            with guarded(rep, "correctness"):
                section_correctness(rep, torch, B, device, backends, args.quick, args.tiny)

        if not (args.skip_correctness or args.sweep_only):
            with guarded(rep, "vocab-parallel"):
                section_vocab_parallel(rep, torch, B, device, args.tiny)

        with guarded(rep, "copy bandwidth"):
            copy_gbps = B.copy_bandwidth(device, num_bytes=(16 << 20) if args.tiny else None)
            rep.data["copy_gbps"] = copy_gbps
            rep.log(f"== device-to-device copy bandwidth: {copy_gbps:.1f} GB/s (read + write)")
            rep.save()

        if not (args.skip_timing or args.sweep_only):
            with guarded(rep, "breakdown"):
                section_breakdown(rep, torch, B, device, [b for b in backends if b != "reference"], args)

        winners = {}
        if args.sweep or args.sweep_only:
            with guarded(rep, "sweep"):
                sweep_rows, winners = section_sweep(rep, torch, B, device,
                                                    [b for b in backends if b != "reference"], args)

        if not (args.skip_timing or args.sweep_only):
            timing_backends = [b for b in backends if args.tiny or b != "reference" or device.type == "cpu"]
            if not args.no_liger:
                with guarded(rep, "baseline checks"):
                    section_baseline_checks(rep, torch, B, device)
            with guarded(rep, "timing"):
                results = section_timing(rep, torch, B, device, timing_backends, args, copy_gbps, winners)
    except Exception as exc:  # noqa: BLE001 - a poisoned CUDA context: report what we have
        rep.log(f"stopping early: the device is in an error state ({type(exc).__name__}); "
                f"rerun with --backends excluding the backend that caused it")
        failed = True

    env = rep.data["env"]
    md = [f"# gpu_check — {env.get('gpu', env.get('device'))}, {env.get('date', '')}",
          "",
          f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
          f"driver/card: {env.get('nvidia_smi', 'n/a')}, commit {env.get('git_commit') or 'n/a'}",
          "",
          f"Copy bandwidth (device to device, read + write): "
          f"{copy_gbps:.0f} GB/s" if copy_gbps else "Copy bandwidth: not measured"]
    if rep.data["correctness"]:
        md += ["", "## Correctness vs float64 (relative errors)", "", correctness_table(rep.data["correctness"])]
    if results:
        md += ["", "## fwd+bwd timing", "",
               "GB/s over N·C·(2·bytes(s) + L·bytes(t)); ×X: speed over X (> 1 is faster); peak extra: "
               "max_memory_allocated during one call minus the memory held before it (gradient included).",
               "", B.markdown_table(results, copy_gbps)]
        targets = targets_summary(B, results, copy_gbps)
        if targets:
            md += ["", "## Targets (bf16, N=16384, C=131072)", "", targets]
    if rep.data.get("breakdown"):
        md += ["", "## Breakdown of a fused step", "", breakdown_table(rep.data["breakdown"])]
    if sweep_rows:
        md += ["", "## Launch-config sweep (best 5 per shape, and the default)", "", sweep_table(B, sweep_rows)]
    if rep.data["skipped"]:
        md += ["", f"Skipped past the {args.budget_s:.0f} s budget: {len(rep.data['skipped'])} cases "
               f"(listed in gpu_check.json)."]
    failures = [r for r in rep.data["correctness"] if not r.get("ok")]
    md += ["", f"Correctness failures: {len(failures)}; errors: {len(rep.data['errors'])}; "
           f"total time {rep.elapsed():.0f} s."]
    text = "\n".join(md)
    with open(os.path.join(args.out, "gpu_check.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    rep.log("")
    for line in text.splitlines():
        rep.log(line)
    rep.save()
    failed = failed or bool(failures) or bool(rep.data["errors"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
