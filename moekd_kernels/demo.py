"""``python -m moekd_kernels demo``: distil small students on scikit-learn's digits.

The question the demo asks: does MoE-KD help where classic KD fights the labels?
It trains the same student with three losses, under two teachers:

    (a) strong teacher: trained on the student's whole training split;
    (b) weak teacher:   trained on a small stratified fraction of it, so its
                        predictions and the labels often disagree.

Losses (``T = 4``, weights as in mdistiller's KD):

    CE       cross-entropy on the labels
    KD       0.1 · CE + 0.9 · T² · KL(π ‖ q)                (Hinton)
    MoE-KD   fused_moe_kd_loss(expert_weight=0.1, gate_weight=0.9, temperature=4, β)

With β = 0 MoE-KD has exactly KD's gradient (its loss differs by the constant
0.9 · T² · H(π)), so those two runs must agree to float rounding seed by seed;
the demo checks that and exits non-zero when they do not.

Within a seed every student starts from the same weights and sees the batches
in the same order, so the methods differ only by their loss. The protocol is
fixed in ``DemoConfig`` and was not tuned for any method.

Data: ``sklearn.datasets.load_digits`` (1797 8×8 images, 10 classes), bundled
with scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import resolve_backend
from .loss import fused_moe_kd_loss

REGIMES = ("strong", "weak")
REGIME_TITLES = {
    "strong": "(a) strong teacher: trained on the full training split",
    "weak": "(b) weak teacher: trained on {fraction:.0%} of the training split",
}


@dataclass(frozen=True)
class DemoConfig:
    seeds: int = 5
    epochs: int = 30                     # student epochs
    betas: Tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)
    temperature: float = 4.0
    ce_weight: float = 0.1               # mdistiller KD: CE_LOSS_WEIGHT
    kd_weight: float = 0.9               # mdistiller KD: KD_LOSS_WEIGHT
    test_fraction: float = 0.4
    weak_fraction: float = 0.02          # ~21 training images, ~2 per class
    teacher_hidden: int = 128
    teacher_steps: int = 300             # full-batch Adam
    student_hidden: int = 32
    batch_size: int = 64
    lr: float = 0.05                     # SGD, momentum 0.9, cosine decay
    weight_decay: float = 5e-4
    device: str = "cpu"
    backend: str = "auto"

    @property
    def methods(self) -> Tuple[str, ...]:
        return ("CE", "KD") + tuple(moe_name(b) for b in self.betas)


QUICK = dict(seeds=2, epochs=8, betas=(0.0, 2.0), teacher_steps=150)


def moe_name(beta: float) -> str:
    return f"MoE-KD (β={beta:g})"


@dataclass
class RunResult:
    accuracy: float                      # test accuracy, %
    test_logits: Tensor                  # for the β=0 ≡ KD check
    params: Tensor                       # flattened final weights, same purpose
    agreement: Optional[float] = None    # MoE-KD: mean a over the last epoch
    # β=0 only: max over steps of max|∂L/∂s − ∂KD/∂s| / max|∂KD/∂s|, both at this run's weights.
    grad_gap_to_kd: Optional[float] = None
    steps: int = 0

    @property
    def correct(self) -> int:
        return round(self.accuracy * len(self.test_logits) / 100.0)


@dataclass
class SeedResult:
    teacher_accuracy: float              # test accuracy, %
    teacher_label_agreement: float       # argmax teacher == label on the student's training split, %
    runs: Dict[str, RunResult] = field(default_factory=dict)


# ----------------------------------------------------------------------------- data & models


def load_splits(seed: int, cfg: DemoConfig):
    """Stratified train/test split and a stratified weak-teacher subset of the train split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype("float32") / 16.0     # pixel intensities are 0..16
    y = digits.target.astype("int64")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=cfg.test_fraction, stratify=y, random_state=seed)
    weak_idx, _ = train_test_split(
        range(len(y_train)), train_size=cfg.weak_fraction, stratify=y_train, random_state=seed)
    dev = torch.device(cfg.device)
    as_t = lambda a: torch.as_tensor(a, device=dev)  # noqa: E731
    return as_t(x_train), as_t(y_train), as_t(x_test), as_t(y_test), torch.as_tensor(
        sorted(weak_idx), device=dev)


def mlp(widths: Sequence[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def train_teacher(x: Tensor, y: Tensor, seed: int, cfg: DemoConfig) -> nn.Module:
    torch.manual_seed(10_000 + seed)
    teacher = mlp([x.shape[1], cfg.teacher_hidden, cfg.teacher_hidden, 10]).to(x.device)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-3, weight_decay=1e-4)
    teacher.train()
    for _ in range(cfg.teacher_steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(teacher(x), y).backward()
        opt.step()
    return teacher.eval()


# ----------------------------------------------------------------------------- losses


def kd_loss(s: Tensor, t: Tensor, y: Tensor, cfg: DemoConfig) -> Tensor:
    """mdistiller's KD: λ_e · CE + λ_g · T² · KL(softmax(t/T) ‖ softmax(s/T)), batch mean."""
    tau = cfg.temperature
    kl = F.kl_div(F.log_softmax(s / tau, dim=1), F.log_softmax(t / tau, dim=1),
                  reduction="none", log_target=True).sum(1).mean()
    return cfg.ce_weight * F.cross_entropy(s, y) + cfg.kd_weight * tau * tau * kl


def make_loss(method: str, cfg: DemoConfig):
    """loss_fn(student_logits, teacher_logits, y) -> (loss, agreement or None)."""
    if method == "CE":
        return lambda s, t, y: (F.cross_entropy(s, y), None)
    if method == "KD":
        return lambda s, t, y: (kd_loss(s, t, y, cfg), None)
    beta = next(b for b in cfg.betas if moe_name(b) == method)

    def moe(s, t, y):
        loss, stats = fused_moe_kd_loss(
            s, t, y, temperature=cfg.temperature, expert_strength=beta,
            gate_weight=cfg.kd_weight, expert_weight=cfg.ce_weight,
            backend=cfg.backend, return_stats=True)
        return loss, stats.agreement.mean()

    return moe


# ----------------------------------------------------------------------------- training


def train_student(method: str, init_state, x: Tensor, y: Tensor, t_logits: Tensor,
                  x_test: Tensor, y_test: Tensor, seed: int, cfg: DemoConfig) -> RunResult:
    student = mlp([x.shape[1], cfg.student_hidden, 10]).to(x.device)
    student.load_state_dict(init_state)
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=0.9,
                          weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(y) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    loss_fn = make_loss(method, cfg)
    # β=0 must have KD's gradient: evaluate KD's alongside at the same weights, every step.
    shadow_fn = make_loss("KD", cfg) if method == moe_name(0.0) else None
    # The batch order depends on the seed only, never on the method.
    order = torch.Generator().manual_seed(20_000 + seed)

    last_agreement: List[Tensor] = []
    grad_gaps: List[Tensor] = []
    student.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(y), generator=order).to(x.device)
        for i in range(0, len(y), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            logits = student(x[idx])
            # The loss sees a leaf copy of the logits so that its gradient can be
            # compared with KD's before it is pushed through the network.
            s = logits.detach().requires_grad_()
            loss, agreement = loss_fn(s, t_logits[idx], y[idx])
            (grad_s,) = torch.autograd.grad(loss, s)
            if shadow_fn is not None:
                (grad_kd,) = torch.autograd.grad(shadow_fn(s, t_logits[idx], y[idx])[0], s)
                grad_gaps.append((grad_s - grad_kd).abs().max() / grad_kd.abs().max())
            opt.zero_grad(set_to_none=True)
            logits.backward(grad_s)
            opt.step()
            sched.step()
            if agreement is not None and epoch == cfg.epochs - 1:
                last_agreement.append(agreement.detach())

    student.eval()
    with torch.no_grad():
        test_logits = student(x_test)
    acc = 100.0 * (test_logits.argmax(1) == y_test).float().mean().item()
    params = torch.cat([p.detach().flatten() for p in student.parameters()]).cpu()
    agree = torch.stack(last_agreement).mean().item() if last_agreement else None
    gap = torch.stack(grad_gaps).max().item() if grad_gaps else None
    return RunResult(acc, test_logits.cpu(), params, agree, gap, len(grad_gaps))


def run_seed(seed: int, cfg: DemoConfig, progress) -> Dict[str, SeedResult]:
    x_train, y_train, x_test, y_test, weak_idx = load_splits(seed, cfg)
    torch.manual_seed(seed)
    init_state = copy.deepcopy(mlp([x_train.shape[1], cfg.student_hidden, 10]).to(x_train.device)
                               .state_dict())
    out: Dict[str, SeedResult] = {}
    for regime in REGIMES:
        progress.set_postfix_str(f"seed {seed} {regime} teacher")
        idx = slice(None) if regime == "strong" else weak_idx
        teacher = train_teacher(x_train[idx], y_train[idx], seed, cfg)
        with torch.no_grad():
            t_logits = teacher(x_train)
        res = SeedResult(
            teacher_accuracy=accuracy(teacher, x_test, y_test),
            teacher_label_agreement=100.0 * (t_logits.argmax(1) == y_train).float().mean().item())
        progress.update(1)
        for method in cfg.methods:
            progress.set_postfix_str(f"seed {seed} {regime} {method}")
            res.runs[method] = train_student(method, init_state, x_train, y_train, t_logits,
                                             x_test, y_test, seed, cfg)
            progress.update(1)
        out[regime] = res
    return out


# ----------------------------------------------------------------------------- report


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    std = t.std().item() if len(t) > 1 else 0.0
    return t.mean().item(), std


@dataclass
class Equivalence:
    """β=0 MoE-KD against KD, seed by seed and regime by regime.

    The sharp check is the gradient: at every training step of the β=0 run,
    KD's gradient with respect to the logits is computed at the same weights
    and must agree to float32 rounding. The two independent training runs are
    then compared too, but their weights cannot be held to rounding level: a
    difference of one ulp can flip a ReLU whose input sits at 0 on some step,
    after which the runs differ by ~1e-3 in the weights (still the same
    optimisation problem, hence the same accuracy to a test image or two).
    """

    max_grad_gap: float                  # relative, over all steps, seeds and regimes
    steps: int
    max_param_diff: float
    max_accuracy_diff: float             # percentage points
    max_accuracy_diff_images: int        # difference in correctly classified test images
    same_predictions: int                # runs whose test predictions are all identical
    pairs: int

    # Relative to the step's largest gradient entry. Late in training q − π nearly
    # cancels, so float32 rounding shows up at ~1e-5 relative; a real difference
    # (a weight, a τ factor, the temperature) is 1e-2 or more.
    GRAD_TOLERANCE = 1e-3
    MAX_IMAGES = 2

    @property
    def ok(self) -> bool:
        return (self.max_grad_gap <= self.GRAD_TOLERANCE
                and self.max_accuracy_diff_images <= self.MAX_IMAGES)

    def line(self) -> str:
        verdict = "MATCH" if self.ok else "MISMATCH"
        return (
            f"β=0 vs KD, seed by seed: {verdict}\n"
            f"  gradient wrt the logits at the same weights, every step: max relative difference "
            f"{self.max_grad_gap:.1e} over {self.steps} steps (tolerance {self.GRAD_TOLERANCE:g})\n"
            f"  separate training runs: max |Δ accuracy| {self.max_accuracy_diff:.2f} pts "
            f"({self.max_accuracy_diff_images} test images, tolerance {self.MAX_IMAGES}), identical "
            f"test predictions in {self.same_predictions}/{self.pairs} runs, "
            f"max |Δ weight| {self.max_param_diff:.1e}")


def check_equivalence(results: List[Dict[str, SeedResult]], cfg: DemoConfig) -> Optional[Equivalence]:
    if 0.0 not in cfg.betas:
        return None
    zero = moe_name(0.0)
    gap = acc_d = par_d = 0.0
    images = same = pairs = steps = 0
    for per_seed in results:
        for res in per_seed.values():
            kd, moe = res.runs["KD"], res.runs[zero]
            gap = max(gap, moe.grad_gap_to_kd)
            steps += moe.steps
            acc_d = max(acc_d, abs(kd.accuracy - moe.accuracy))
            images = max(images, abs(kd.correct - moe.correct))
            par_d = max(par_d, (kd.params - moe.params).abs().max().item())
            same += bool(torch.equal(kd.test_logits.argmax(1), moe.test_logits.argmax(1)))
            pairs += 1
    return Equivalence(gap, steps, par_d, acc_d, images, same, pairs)


def format_report(results: List[Dict[str, SeedResult]], cfg: DemoConfig,
                  backend: str, elapsed: float) -> str:
    lines = []
    seeds = len(results)
    for regime in REGIMES:
        per = [r[regime] for r in results]
        t_acc = mean_std([p.teacher_accuracy for p in per])
        t_agree = mean_std([p.teacher_label_agreement for p in per])
        lines.append("")
        lines.append(REGIME_TITLES[regime].format(fraction=cfg.weak_fraction))
        lines.append(f"  teacher test accuracy {t_acc[0]:5.2f} ± {t_acc[1]:.2f} %; "
                     f"teacher argmax = label on {t_agree[0]:.1f} % of the student's training images")
        lines.append(f"  {'method':<16}{'test accuracy (%)':>20}{'Δ vs KD (paired)':>20}{'agreement a':>14}")
        for method in cfg.methods:
            m, s = mean_std([p.runs[method].accuracy for p in per])
            # Seeds share splits, teachers and student init, so per-seed differences
            # are far less noisy than the spread of each method across seeds.
            if method == "KD":
                delta_s = f"{'':20}"
            else:
                dm, ds = mean_std([p.runs[method].accuracy - p.runs["KD"].accuracy for p in per])
                delta_s = f"{dm:+13.2f} ± {ds:4.2f}"
            agree = [p.runs[method].agreement for p in per]
            agree_s = f"{sum(agree) / len(agree):14.3f}" if agree[0] is not None else ""
            lines.append(f"  {method:<16}{m:>13.2f} ± {s:4.2f}{delta_s}{agree_s}".rstrip())
    header = [
        f"MoE-KD demo: scikit-learn digits, {seeds} seeds, {cfg.epochs} student epochs, "
        f"T={cfg.temperature:g}, loss = {cfg.ce_weight:g}·CE + {cfg.kd_weight:g}·(KD term), "
        f"loss backend {backend!r} on {cfg.device}",
        f"students: MLP 64-{cfg.student_hidden}-10, SGD; teachers: MLP 64-{cfg.teacher_hidden}-"
        f"{cfg.teacher_hidden}-10, Adam. Accuracy on the held-out {cfg.test_fraction:.0%} (mean ± std "
        f"over seeds); agreement a = mean posterior that the teacher's prediction is the label "
        f"(last epoch).",
    ]
    footer = [""]
    eq = check_equivalence(results, cfg)
    if eq is not None:
        footer.append(eq.line())
    footer.append(f"total time {elapsed:.1f} s")
    return "\n".join(header + lines + footer)


def plot(results: List[Dict[str, SeedResult]], cfg: DemoConfig, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = cfg.methods
    fig, axes = plt.subplots(1, len(REGIMES), figsize=(5.5 * len(REGIMES), 4), sharey=True)
    for ax, regime in zip(axes, REGIMES):
        per = [r[regime] for r in results]
        stats = [mean_std([p.runs[m].accuracy for p in per]) for m in methods]
        colors = ["#888888", "#4c72b0"] + ["#dd8452"] * (len(methods) - 2)
        ax.bar(range(len(methods)), [m for m, _ in stats], yerr=[s for _, s in stats],
               color=colors, capsize=3)
        t_acc = mean_std([p.teacher_accuracy for p in per])[0]
        ax.axhline(t_acc, color="black", linestyle="--", linewidth=1, label=f"teacher {t_acc:.1f} %")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right")
        ax.set_title(REGIME_TITLES[regime].format(fraction=cfg.weak_fraction).split(": ")[0],
                     fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
        lows = [m - s for m, s in stats] + [t_acc]
        ax.set_ylim(max(0.0, min(lows) - 3.0), 100.0)
    axes[0].set_ylabel(f"test accuracy, % (mean ± std, {len(results)} seeds)")
    fig.suptitle("Digits: CE vs KD vs MoE-KD")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--seeds", type=int, default=None, help=f"number of seeds (default {d.seeds})")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"student training epochs (default {d.epochs})")
    parser.add_argument("--betas", type=str, default=None,
                        help="comma-separated MoE-KD expert strengths β (default "
                             + ",".join(f"{b:g}" for b in d.betas) + "); include 0 for the KD check")
    parser.add_argument("--weak-fraction", type=float, default=None,
                        help="fraction of the training split the weak teacher sees "
                             f"(default {d.weak_fraction:g})")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--backend", default="auto",
                        help="MoE-KD loss backend: auto, reference, cpu, triton, cuda (default auto)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a fast smoke run ({QUICK['seeds']} seeds, {QUICK['epochs']} epochs, "
                             f"β in {QUICK['betas']})")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="write a bar chart")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    cfg = DemoConfig(device=args.device, backend=args.backend)
    if args.quick:
        cfg = replace(cfg, **QUICK)
    if args.seeds is not None:
        cfg = replace(cfg, seeds=args.seeds)
    if args.epochs is not None:
        cfg = replace(cfg, epochs=args.epochs)
    if args.betas is not None:
        cfg = replace(cfg, betas=tuple(float(b) for b in args.betas.split(",") if b.strip()))
    if args.weak_fraction is not None:
        cfg = replace(cfg, weak_fraction=args.weak_fraction)
    if not 0.0 < cfg.weak_fraction < 1.0:
        raise SystemExit("--weak-fraction must be in (0, 1)")
    if cfg.seeds < 1 or cfg.epochs < 1:
        raise SystemExit("--seeds and --epochs must be >= 1")
    if any(b < 0 for b in cfg.betas) or len(set(cfg.betas)) != len(cfg.betas):
        raise SystemExit("--betas must be distinct values >= 0")
    return cfg


def run_demo(cfg: DemoConfig, *, show_progress: bool = True) -> List[Dict[str, SeedResult]]:
    from tqdm.auto import tqdm

    total = cfg.seeds * len(REGIMES) * (1 + len(cfg.methods))
    results = []
    # Batches of 64 digits are far too small to split across threads: a second
    # thread only adds synchronisation, and stalls outright when the cores are
    # shared. One thread is faster here and keeps the runtime predictable.
    threads = torch.get_num_threads()
    if torch.device(cfg.device).type == "cpu":
        torch.set_num_threads(1)
    try:
        with tqdm(total=total, desc="demo", unit="run", disable=not show_progress,
                  file=sys.stderr) as progress:
            for seed in range(cfg.seeds):
                results.append(run_seed(seed, cfg, progress))
    finally:
        torch.set_num_threads(threads)
    return results


DEMO_EXTRA_HINT = 'pip install -e ".[demo]"  (or: pip install scikit-learn matplotlib)'


def require_demo_dependencies(plot: bool) -> None:
    """Fail before any training when an optional dependency of the demo is missing.

    scikit-learn provides the data and matplotlib the ``--plot`` chart; without this
    check a missing matplotlib would surface only after the whole run.
    """
    needed = [("sklearn", "scikit-learn", "the digits data")]
    if plot:
        needed.append(("matplotlib", "matplotlib", "the --plot chart"))
    missing = []
    for module, package, purpose in needed:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(f"{package} ({purpose})")
    if missing:
        raise SystemExit(f"python -m moekd_kernels demo: {' and '.join(missing)} not installed. "
                         f"Install the demo extra: {DEMO_EXTRA_HINT}")


def run(args: argparse.Namespace) -> int:
    require_demo_dependencies(plot=bool(args.plot))
    cfg = config_from_args(args)
    start = time.perf_counter()  # includes a JIT build of the loss kernel, if any
    backend = resolve_backend(cfg.backend, torch.device(cfg.device))
    results = run_demo(cfg)
    elapsed = time.perf_counter() - start
    print(format_report(results, cfg, backend, elapsed))
    if args.plot:
        plot(results, cfg, args.plot)
        print(f"bar chart written to {args.plot}")
    eq = check_equivalence(results, cfg)
    return 0 if eq is None or eq.ok else 1
