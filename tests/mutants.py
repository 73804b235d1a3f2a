"""Mutation testing: does the suite tell right from nearly right?

    python tests/mutants.py            every mutant (about 15 minutes on 2 cores)
    python tests/mutants.py --list     the table of mutants, and whether each still applies
    python tests/mutants.py -k NAME    the mutants whose name contains NAME (repeatable)

The repository's files (git ls-files, plus untracked ones git does not ignore) are
copied to a fixed directory, /tmp/moekd-mutants/repo, with a fixed kernel cache next to
it (MOEKD_KERNELS_CACHE=/tmp/moekd-mutants/cache): since paths never change, the C++ JIT
build recompiles only the translation unit a mutant touches. Files are copied only where
their content changed, so a second run starts warm.

First each selection of tests the chosen mutants use runs on the unmutated copy (a
failing baseline would make every mutant look caught: it stops the run). Then each
mutant replaces one exact text in one file (it must occur exactly once: a text that
no longer matches is an error, so the table cannot rot silently), runs its tests
(pytest -x, with a timeout), and restores the file. The table says which tests failed,
or SURVIVED. Exit status 1 if a mutant that should be caught survived, 2 if a mutant
no longer applies or the baseline fails.

Not collected by pytest (the name does not start with test_), and nothing runs on import.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
WORK = Path("/tmp/moekd-mutants")
COPY = WORK / "repo"
CACHE = WORK / "cache"
TIMEOUT_S = 600

# Named test selections: each is a few pytest runs (arguments, from the copy's root).
# Mutants refer to them by name, so the baseline runs each selection once.
SELECTIONS: Dict[str, Tuple[Tuple[str, ...], ...]] = {
    "cpu-oracle": (("tests/test_cpu_backend.py", "-k", "test_matches_oracle or levels_with_their_own"),),
    "cpu-long-rows": (("tests/test_properties.py", "-k", "cpu and long_rows"),
                      ("tests/test_cpu_backend.py", "-k", "test_matches_oracle")),
    "reductions": (("tests/test_properties.py::test_reductions_match_float64_oracle",),
                   ("tests/test_adversarial.py", "-k", "custom_ignore_index")),
    "reference": (("tests/test_reference.py",),
                  ("tests/test_properties.py", "-k", "reference and matches_float64")),
    "triton-multi-block": (("tests/test_properties.py", "-k", "triton and long_rows"),
                           ("tests/test_triton_backend.py", "-k", "multi_block")),
    "cuda-emulation": (("tests/test_cuda_backend.py", "-k", "emulated_rows_match_oracle"),),
    "top-k-reference": (("tests/test_teachers.py", "-k", "reference"),),
    "top-k-cpu": (("tests/test_teachers.py", "-k", "cpu"), ("tests/test_phases.py",)),
    "top-k-triton": (("tests/test_triton_backend.py", "-k", "top_k"),),
    "triton-phases": (("tests/test_triton_backend.py", "-k", "phases"), ("tests/test_phases.py", "-k", "triton")),
    "vocab-parallel": (("tests/test_vocab_parallel.py",),),
    "fused-linear": (("tests/test_fused_linear.py", "-k", "chunk"),),
}


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str              # relative to the repository root
    old: str               # must occur exactly once in the file
    new: str
    selection: str         # key of SELECTIONS
    equivalent: str = ""   # non-empty: an expected survivor, and why it cannot be caught


MUTANTS: Tuple[Mutant, ...] = (
    # ---- the C++ CPU kernel (csrc/cpu/moekd_cpu.cpp): stores and each pass ----
    Mutant("cpu-fp16-store-truncates", "csrc/cpu/moekd_cpu.cpp",
           "const uint32_t normal = (a - ((127u - 15u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;",
           "const uint32_t normal = (a - ((127u - 15u) << 23)) >> 13;", "cpu-oracle"),
    Mutant("cpu-bf16-store-truncates", "csrc/cpu/moekd_cpu.cpp",
           "const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;",
           "const uint32_t rounded = b >> 16;", "cpu-oracle"),
    Mutant("cpu-pass1-keeps-only-the-last-sum-block", "csrc/cpu/moekd_cpu.cpp",
           "      acc += e;\n    }\n    total += acc;", "      acc += e;\n    }\n    total = acc;",
           "cpu-long-rows"),
    Mutant("cpu-pass2-keeps-only-the-last-log-q-block", "csrc/cpu/moekd_cpu.cpp",
           "sum_u_log_q += acc_ulogq;", "sum_u_log_q = acc_ulogq;", "cpu-long-rows"),
    Mutant("cpu-pass3-drops-earlier-levels", "csrc/cpu/moekd_cpu.cpp",
           "for (int64_t j = 0; j < C; ++j) g[j] += mul_add(r_coeff, factor[j], q_coeff * eq[j]);",
           "for (int64_t j = 0; j < C; ++j) g[j] = mul_add(r_coeff, factor[j], q_coeff * eq[j]);",
           "cpu-oracle"),
    Mutant("expm1-beta-as-exp-minus-one-in-float32", "csrc/common/moekd_math.h",
           "p.expm1_beta[l] = (float)expm1(beta[l]);",
           "p.expm1_beta[l] = expf((float)beta[l]) - 1.0f;", "cpu-oracle",
           equivalent="D = 1 + expm1(β)σ: for small β, where expf(β) − 1 cancels, expm1(β)σ ≪ 1, so "
                      "D, log D and the gradient term σ r expm1(β)/D move by ~3e-9, far below the "
                      "float32 rounding of the outputs; for large β there is no cancellation"),
    # ---- the glue (moekd_kernels/ops.py) ----
    Mutant("mean-divides-by-nonnegative-targets", "moekd_kernels/ops.py",
           "return (target != ignore_index).sum().clamp_min(1)",
           "return (target >= 0).sum().clamp_min(1)", "reductions"),
    # ---- the reference (moekd_kernels/reference.py) ----
    Mutant("reference-drops-tau-squared", "moekd_kernels/reference.py",
           "gate_ce = gate_ce + tau * tau * _xlogy_safe(r_l, log_q).sum(1)",
           "gate_ce = gate_ce + _xlogy_safe(r_l, log_q).sum(1)", "reference"),
    # ---- the Triton kernel (moekd_kernels/triton_kernels.py), multi-block passes ----
    Mutant("triton-pass1-tau-one-rescale-skipped", "moekd_kernels/triton_kernels.py",
           "z_s = z_s * _rescale(m_s, m_new, 1.0) + bz_s * _rescale(bm_s, m_new, 1.0)",
           "z_s = z_s + bz_s * _rescale(bm_s, m_new, 1.0)", "triton-multi-block"),
    Mutant("triton-pass1-gate-rescale-ignores-tau", "moekd_kernels/triton_kernels.py",
           "z_q = z_q * _rescale(m_s, m_new, inv_tau) + bz_q * _rescale(bm_s, m_new, inv_tau)",
           "z_q = z_q * _rescale(m_s, m_new, 1.0) + bz_q * _rescale(bm_s, m_new, 1.0)", "triton-multi-block"),
    Mutant("triton-pass2-keeps-only-the-last-log-D-block", "moekd_kernels/triton_kernels.py",
           "_u_sums(u, D, inv_D, log_q, HAS_EXPERT, HAS_GATE)\n        G += bG\n        u_over_D += bD\n"
           "        u_log_D += blogD",
           "_u_sums(u, D, inv_D, log_q, HAS_EXPERT, HAS_GATE)\n        G += bG\n        u_over_D += bD\n"
           "        u_log_D = blogD",
           "triton-multi-block"),
    Mutant("triton-pass3-target-by-block-offset", "moekd_kernels/triton_kernels.py",
           "log_zt,\n            inv_tau, exp_beta, expm1_beta, level_weight, HAS_GATE)\n"
           "        grad = grad_scale * _block_grad(sigma, inv_D, u, log_q, cols == y, tau,",
           "log_zt,\n            inv_tau, exp_beta, expm1_beta, level_weight, HAS_GATE)\n"
           "        grad = grad_scale * _block_grad(sigma, inv_D, u, log_q, cols0 == y, tau,",
           "triton-multi-block"),
    # ---- the Triton phase kernel over a class slice (moe_kd_phase_kernel) ----
    Mutant("triton-phase1-keeps-only-the-last-block", "moekd_kernels/triton_kernels.py",
           "            z_s += bz_s\n            z_q += bz_q", "            z_s = bz_s\n            z_q = bz_q",
           "triton-phases"),
    Mutant("triton-phase-top-k-reads-entries-past-the-slice", "moekd_kernels/triton_kernels.py",
           'listed = (v != float("-inf")) & (c >= 0) & (c < num_classes)',
           'listed = (v != float("-inf")) & (c >= 0)', "triton-phases"),
    Mutant("triton-phase2-target-u-on-every-slice", "moekd_kernels/triton_kernels.py",
           "u_y = tl.where(owns_y, _target_u(pi_y, log_sigma_y, exp_beta_v, expm1_beta_v, w_v), 0.0)",
           "u_y = _target_u(pi_y, log_sigma_y, exp_beta_v, expm1_beta_v, w_v)", "triton-phases"),
    Mutant("triton-phase3-target-by-global-class", "moekd_kernels/triton_kernels.py",
           "y_here = tl.where(owns_y, y - class_offset, -1)", "y_here = tl.where(owns_y, y, -1)",
           "triton-phases"),
    # ---- the CUDA kernel's per-thread code (csrc/cuda/moekd_row.h), run by the host emulation ----
    Mutant("cuda-pass1-merge-skips-the-rescale", "csrc/cuda/moekd_row.h",
           "a.s_sum = a.s_sum * rescale(a.s_max, M, kLog2e) + b.s_sum * rescale(b.s_max, M, kLog2e);",
           "a.s_sum = a.s_sum + b.s_sum * rescale(b.s_max, M, kLog2e);", "cuda-emulation"),
    Mutant("cuda-pass2-merge-drops-a-log-D-sum", "csrc/cuda/moekd_row.h",
           "a.u_log_D_rest += b.u_log_D_rest;", "a.u_log_D_rest = b.u_log_D_rest;", "cuda-emulation"),
    Mutant("cuda-pass3-gate-sign", "csrc/cuda/moekd_row.h",
           "c.gate_tau * (c.R * q - r);", "c.gate_tau * (c.R * q + r);", "cuda-emulation"),
    # ---- the top-k teacher: the PyTorch loader (reference) and the Triton kernel ----
    Mutant("top-k-loader-miscounts-unlisted-classes", "moekd_kernels/phases.py",
           "self.num_rest = width - self.in_slice.sum(2)",
           "self.num_rest = width - self.in_slice.sum(2) - 1", "top-k-reference"),
    Mutant("cpu-top-k-loader-miscounts-unlisted-classes", "csrc/cpu/moekd_cpu.cpp",
           "double total = listed < C ? static_cast<double>(C - listed) * e_rest : 0.0;",
           "double total = listed < C ? static_cast<double>(C - listed - 1) * e_rest : 0.0;", "top-k-cpu"),
    Mutant("triton-top-k-miscounts-unlisted-classes", "moekd_kernels/triton_kernels.py",
           "num_rest = num_classes - num_listed ",
           "num_rest = num_classes - num_listed - 1 ", "top-k-triton"),
    Mutant("triton-top-k-listed-gradient-not-rewritten", "moekd_kernels/triton_kernels.py",
           "tl.store(grad_row + q_class, _round_to(grad, grad_row.dtype.element_ty), mask=q_listed)",
           "tl.store(grad_row + q_class, _round_to(grad, grad_row.dtype.element_ty), mask=q_listed & False)",
           "top-k-triton"),
    # ---- vocab-parallel: the phases' sums and the agreement on inputs ----
    Mutant("phases-estep-drops-log-D", "moekd_kernels/phases.py",
           "(u * terms.D.log()).sum((0, 2))[None],", "(u * terms.D.log()).sum((0, 2))[None] * 0,",
           "vocab-parallel"),
    Mutant("vocab-parallel-target-range-unchecked", "moekd_kernels/vocab_parallel.py",
           "if low < 0 or high >= total:", "if low < 0:", "vocab-parallel"),
    Mutant("vocab-parallel-hidden-gradient-not-summed", "moekd_kernels/vocab_parallel.py",
           "            return self.comm.sum_(tensor)\n", "            return tensor\n", "vocab-parallel"),
    # A caught error must not keep the group alive (its gloo threads abort the process at exit).
    Mutant("vocab-parallel-raised-error-holds-the-group", "moekd_kernels/vocab_parallel.py",
           "        del error\n", "        pass\n", "vocab-parallel"),
    # A rank that fails its checks while compiling must still join the agreement (else: a hang).
    Mutant("vocab-parallel-tracing-rank-does-not-join", "moekd_kernels/vocab_parallel.py",
           "        _reject_while_tracing(process_group.group_name, type(error).__name__, str(error))",
           "        raise error", "vocab-parallel"),
    # ---- fused linear: gradients accumulated over chunks ----
    Mutant("fused-linear-bias-gradient-keeps-the-last-chunk", "moekd_kernels/fused_linear.py",
           "grad_bias.add_(grad.sum(0, dtype=acc))", "grad_bias.copy_(grad.sum(0, dtype=acc))",
           "fused-linear"),
    Mutant("fused-linear-weight-gradient-keeps-the-last-chunk", "moekd_kernels/fused_linear.py",
           "acc.addmm_(a, b)", "acc.copy_(torch.mm(a, b))", "fused-linear"),
    # The loss of a row, shared by the C++ and CUDA kernels (csrc/common/moekd_math.h).
    Mutant("row-loss-drops-a-tau", "csrc/common/moekd_math.h",
           "gate -= static_cast<double>(p.tau[l]) * p.tau[l] * s.u_log_q[l];",
           "gate -= static_cast<double>(p.tau[l]) * s.u_log_q[l];", "cuda-emulation"),
)


# ---------------------------------------------------------------------------------
# The working copy
# ---------------------------------------------------------------------------------

def repo_files() -> List[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=ROOT, capture_output=True, check=True).stdout
    return sorted({f for f in out.decode().split("\0") if f and (ROOT / f).is_file()})


def sync_copy() -> None:
    """Mirror the repository's files into COPY, writing only files whose bytes differ
    (unchanged files keep their mtime, so ninja rebuilds nothing for them)."""
    files = repo_files()
    wanted = set(files)
    for rel in files:
        src, dst = ROOT / rel, COPY / rel
        data = src.read_bytes()
        if dst.is_file() and dst.read_bytes() == data:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        shutil.copymode(src, dst)
    for path in COPY.rglob("*"):           # tracked files that no longer exist
        rel = path.relative_to(COPY).as_posix()
        if path.is_file() and rel not in wanted and not any(
                part in ("__pycache__", ".pytest_cache", ".hypothesis") for part in path.parts):
            path.unlink()


def check_applies(m: Mutant) -> Optional[str]:
    """None if ``m.old`` occurs exactly once in its file (in the repository), else why not."""
    path = ROOT / m.path
    if not path.is_file():
        return f"{m.path} does not exist"
    count = path.read_text().count(m.old)
    if count != 1:
        return f"the text to replace occurs {count} times in {m.path} (must be exactly once): {m.old!r}"
    if m.selection not in SELECTIONS:
        return f"unknown test selection {m.selection!r}"
    return None


# ---------------------------------------------------------------------------------
# Running tests
# ---------------------------------------------------------------------------------

def run_selection(selection: str) -> Tuple[bool, List[str], str]:
    """(passed, failing test ids, output tail) of every pytest run of the selection."""
    env = {**os.environ, "PYTHONPATH": str(COPY), "MOEKD_KERNELS_CACHE": str(CACHE),
           "MOEKD_HYPOTHESIS_PROFILE": "mutants", "PYTHONDONTWRITEBYTECODE": "1"}
    failed: List[str] = []
    tail = ""
    for args in SELECTIONS[selection]:
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *args]
        try:
            proc = subprocess.run(cmd, cwd=COPY, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return False, [f"TIMEOUT after {TIMEOUT_S} s: {' '.join(args)}"], ""
        out = proc.stdout + proc.stderr
        tail = out[-3000:]
        if proc.returncode == 5:          # no tests collected: a selection that rotted
            return False, [f"NO TESTS SELECTED by {' '.join(args)}"], tail
        if proc.returncode != 0:
            ids = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)
            failed += ids or [f"pytest exit {proc.returncode}: {' '.join(args)}"]
            return False, failed, tail
    return True, failed, tail


def apply(m: Mutant) -> str:
    path = COPY / m.path
    original = path.read_text()
    assert original.count(m.old) == 1, f"{m.name}: the copy of {m.path} differs from the repository"
    path.write_text(original.replace(m.old, m.new))
    return original


# ---------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------

def print_table(rows: Sequence[Tuple[str, str, str]]) -> None:
    width = max([len("mutant")] + [len(r[0]) for r in rows])
    print(f"\n{'mutant':<{width}}  {'result':<22}  tests that failed / note")
    print(f"{'-' * width}  {'-' * 22}  {'-' * 40}")
    for name, result, detail in rows:
        print(f"{name:<{width}}  {result:<22}  {detail}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and whether each applies")
    parser.add_argument("-k", dest="names", action="append", default=[],
                        help="run only mutants whose name contains this (repeatable)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the run of the selections on the unmutated copy")
    args = parser.parse_args(argv)

    stale = {m.name: why for m in MUTANTS if (why := check_applies(m)) is not None}
    if args.list:
        for m in MUTANTS:
            state = f"STALE: {stale[m.name]}" if m.name in stale else (
                "expected survivor" if m.equivalent else "must be caught")
            print(f"{m.name:<45} {m.path:<34} [{m.selection}] {state}")
        return 2 if stale else 0
    if stale:
        for name, why in stale.items():
            print(f"mutants.py: mutant {name!r} no longer applies: {why}", file=sys.stderr)
        print("mutants.py: update the MUTANTS table (tests/mutants.py) to the current code.", file=sys.stderr)
        return 2
    chosen = [m for m in MUTANTS if not args.names or any(n in m.name for n in args.names)]
    if not chosen:
        print(f"mutants.py: no mutant matches {args.names}", file=sys.stderr)
        return 2

    WORK.mkdir(parents=True, exist_ok=True)
    sync_copy()
    print(f"mutants.py: {len(chosen)} mutant(s); copy in {COPY}, kernel cache in {CACHE}", flush=True)

    if not args.no_baseline:
        for selection in dict.fromkeys(m.selection for m in chosen):
            t0 = time.time()
            ok, failed, tail = run_selection(selection)
            print(f"  baseline [{selection}]: {'ok' if ok else 'FAILED'} ({time.time() - t0:.0f} s)", flush=True)
            if not ok:
                print(tail, file=sys.stderr)
                print(f"mutants.py: the unmutated code fails [{selection}]: {', '.join(failed)}; "
                      "fix that first (every mutant would look caught).", file=sys.stderr)
                return 2

    rows, survivors = [], []
    for m in chosen:
        t0 = time.time()
        original = apply(m)
        try:
            ok, failed, _ = run_selection(m.selection)
        finally:
            (COPY / m.path).write_text(original)
        seconds = f"{time.time() - t0:.0f} s"
        if ok and m.equivalent:
            rows.append((m.name, "survived (equivalent)", f"{m.equivalent} [{seconds}]"))
        elif ok:
            rows.append((m.name, "SURVIVED", f"[{m.selection}] passed [{seconds}]"))
            survivors.append(m.name)
        else:
            shown = ", ".join(failed[:3]) + (f" (+{len(failed) - 3})" if len(failed) > 3 else "")
            rows.append((m.name, "caught", f"{shown} [{seconds}]"))
        print(f"  {m.name}: {rows[-1][1]} ({seconds})", flush=True)

    print_table(rows)
    if survivors:
        print(f"\nmutants.py: {len(survivors)} mutant(s) survived: {', '.join(survivors)}")
        return 1
    print(f"\nmutants.py: every mutant caught ({sum(1 for m in chosen if m.equivalent)} expected survivor(s)).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
