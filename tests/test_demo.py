"""The digits demo: its table, its β=0 ≡ KD check, and its command line."""

import argparse
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

from moekd_kernels import demo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def quick_config(**overrides):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return dataclasses.replace(demo.config_from_args(parser.parse_args(["--quick"])), **overrides)


@pytest.fixture(scope="module")
def quick_run():
    cfg = quick_config()
    results = demo.run_demo(cfg, show_progress=False)
    return cfg, results, demo.format_report(results, cfg, "auto", 0.0)


def test_table_has_every_regime_and_method(quick_run):
    cfg, results, report = quick_run
    assert cfg.betas == (0.0, 2.0) and cfg.seeds == 2
    for title in ("(a) strong teacher", "(b) weak teacher"):
        assert title in report
    row = re.compile(r"^  (CE|KD|MoE-KD \(β=\d+\))\s+(\d+\.\d\d) ± (\d+\.\d\d)", re.M)
    names = [m.group(1) for m in row.finditer(report)]
    assert names == ["CE", "KD", "MoE-KD (β=0)", "MoE-KD (β=2)"] * 2
    assert len(re.findall(r"teacher test accuracy +\d+\.\d\d ± \d+\.\d\d %", report)) == 2
    # The agreement column is filled for MoE-KD rows only, with a value in (0, 1).
    agree = re.findall(r"^  MoE-KD \(β=\d\).*\s(0\.\d{3})$", report, re.M)
    assert len(agree) == 4
    for per_seed in results:
        for res in per_seed.values():
            assert 50.0 < res.teacher_accuracy <= 100.0
            for method in cfg.methods:
                assert 50.0 < res.runs[method].accuracy <= 100.0, method


def test_beta_zero_equals_kd_seed_by_seed(quick_run):
    cfg, results, report = quick_run
    zero = demo.moe_name(0.0)
    for seed, per_seed in enumerate(results):
        for regime, res in per_seed.items():
            kd, moe = res.runs["KD"], res.runs[zero]
            where = f"seed {seed}, {regime} teacher"
            # Same gradient at the same weights, every step, to float32 rounding.
            assert moe.steps == cfg.epochs * 17, where  # 1078 training images, batches of 64
            assert moe.grad_gap_to_kd < 1e-4, where
            # The separate runs end where rounding lets them: a ReLU flipped by one ulp
            # on some step moves the weights by ~1e-3 (see demo.Equivalence), never more.
            assert (kd.params - moe.params).abs().max().item() < 1e-2, where
            assert abs(kd.correct - moe.correct) <= demo.Equivalence.MAX_IMAGES, where
    eq = demo.check_equivalence(results, cfg)
    assert eq.ok and eq.pairs == 2 * cfg.seeds
    assert "β=0 vs KD, seed by seed: MATCH" in report


def test_equivalence_check_catches_a_different_loss(monkeypatch):
    """The check must fail when β=0 MoE-KD is not KD (here: gate weight 0.8, not 0.9)."""
    real = demo.fused_moe_kd_loss

    def off_by_a_weight(*args, **kwargs):
        return real(*args, **{**kwargs, "gate_weight": 0.8})

    monkeypatch.setattr(demo, "fused_moe_kd_loss", off_by_a_weight)
    cfg = quick_config(seeds=1, epochs=1, betas=(0.0,))
    results = demo.run_demo(cfg, show_progress=False)
    eq = demo.check_equivalence(results, cfg)
    assert eq.max_grad_gap > 1e-2
    assert not eq.ok
    assert "MISMATCH" in demo.format_report(results, cfg, "auto", 0.0)


def test_command_line_prints_the_table_and_writes_the_plot(tmp_path):
    png = tmp_path / "demo.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "moekd_kernels", "demo", "--seeds", "1", "--epochs", "1",
         "--betas", "0,3", "--backend", "reference", "--plot", str(png)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "loss backend 'reference'" in out
    for name in ("CE", "KD", "MoE-KD (β=0)", "MoE-KD (β=3)"):
        assert re.search(rf"^  {re.escape(name)} +\d+\.\d\d ± 0\.00", out, re.M), name
    assert "seed by seed: MATCH" in out
    assert "demo:" in proc.stderr  # the tqdm bar
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_options_are_rejected():
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    for argv in (["--seeds", "0"], ["--betas", "-1"], ["--betas", "1,1"], ["--weak-fraction", "1.5"]):
        with pytest.raises(SystemExit):
            demo.config_from_args(parser.parse_args(argv))


class TrainingStarted(Exception):
    pass


@pytest.fixture
def no_training(monkeypatch):
    """Make any start of the demo's work visible: the dependency check must come first."""
    def started(*args, **kwargs):
        raise TrainingStarted

    monkeypatch.setattr(demo, "resolve_backend", started)
    monkeypatch.setattr(demo, "run_demo", started)


def demo_args(argv):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("missing, argv, named", [
    ("matplotlib", ["--plot", "demo.png"], "matplotlib (the --plot chart)"),
    ("sklearn", [], "scikit-learn (the digits data)"),
])
def test_a_missing_dependency_fails_before_training_with_the_install_hint(
        monkeypatch, no_training, missing, argv, named):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` raise ImportError
    with pytest.raises(SystemExit) as exc:
        demo.run(demo_args(argv))
    message = str(exc.value)
    assert named in message
    assert 'pip install -e ".[demo]"' in message


def test_matplotlib_is_not_required_without_plot(monkeypatch, no_training):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(TrainingStarted):
        demo.run(demo_args(["--quick"]))


def test_command_line_exits_at_once_when_matplotlib_is_missing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = ("import sys; sys.modules['matplotlib'] = None\n"
              "from moekd_kernels.__main__ import main\n"
              "sys.exit(main(['demo', '--plot', 'demo.png']))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "matplotlib (the --plot chart) not installed" in proc.stderr
    assert 'pip install -e ".[demo]"' in proc.stderr
    assert "%|" not in proc.stderr  # no progress bar: nothing was trained
    assert not (tmp_path / "demo.png").exists()
