"""The drop-in examples under python/ run at tiny sizes and do what they claim."""

import importlib
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekd_kernels import fused_moe_kd_loss

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "python"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require(module):
    """Skip when an optional dependency is missing, except in CI where it must be installed."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture(autouse=True)
def one_thread():
    # The examples' tensors are tiny; a second thread only slows them down on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mean(values):
    return sum(values) / len(values)


def test_plain_loop():
    result = load_example("plain_loop").main(["--tiny"])
    losses = result["losses"]
    assert all(math.isfinite(v) for v in losses)
    assert mean(losses[-10:]) < mean(losses[:10])
    # 20 classes: chance is 0.05.
    assert result["teacher_accuracy"] > 0.5
    assert result["student_accuracy"] > 0.3


def test_plain_loop_runs_as_a_script():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "plain_loop.py"), "--tiny"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "student test accuracy" in proc.stdout


def test_token_distillation():
    td = load_example("token_distillation")
    result = td.main(["--tiny"])
    assert result["student_ce"] < result["student_ce_before"] - 0.5
    ll = result["log_likelihoods"]
    assert all(math.isfinite(v) for v in ll)
    assert mean(ll[-5:]) > mean(ll[:5])


def test_token_distillation_shift_and_padding_match_the_real_tokens():
    """The (B, T, V) call with -100 padding equals the loss over the real next-token rows only."""
    td = load_example("token_distillation")
    gen = torch.Generator().manual_seed(0)
    vocab = 40
    transitions = torch.rand(vocab, vocab, generator=gen)
    transitions[:, td.PAD_ID] = 0
    ids, labels = td.make_batch(transitions, 6, 12, gen)
    assert (labels == td.IGNORE_INDEX).any() and (labels != td.IGNORE_INDEX).any()
    student = torch.randn(6, 12, vocab, generator=gen, requires_grad=True)
    teacher = torch.randn(6, 12, vocab, generator=gen)

    s, y = td.shifted(student, labels)
    t, _ = td.shifted(teacher, labels)
    assert s.shape == (6, 11, vocab) and y.shape == (6, 11)
    loss = fused_moe_kd_loss(s, t, y, ignore_index=td.IGNORE_INDEX)
    loss.backward()

    # By hand: the prediction at position i scores token i + 1, padding dropped.
    rows = [(b, i) for b in range(6) for i in range(11) if labels[b, i + 1] != td.IGNORE_INDEX]
    s_rows = torch.stack([student.detach()[b, i] for b, i in rows])
    t_rows = torch.stack([teacher[b, i] for b, i in rows])
    y_rows = torch.stack([ids[b, i + 1] for b, i in rows])
    expected = fused_moe_kd_loss(s_rows, t_rows, y_rows)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # No gradient at padded targets, nor at the last position (it predicts nothing).
    padded = torch.ones(6, 12, dtype=torch.bool)
    for b, i in rows:
        padded[b, i] = False
    assert student.grad[padded].abs().max() == 0
    assert student.grad[~padded].abs().sum(-1).min() > 0


def test_hf_trainer():
    require("transformers")
    require("accelerate")  # transformers.Trainer needs it
    hf = load_example("hf_trainer")
    seen = []
    original = hf.MoEKDTrainer.compute_loss

    def recording(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.append(num_items_in_batch)
        return original(self, model, inputs, return_outputs, num_items_in_batch)

    hf.MoEKDTrainer.compute_loss = recording
    try:
        result = hf.main(["--tiny"])
    finally:
        hf.MoEKDTrainer.compute_loss = original
    assert all(math.isfinite(v) for v in result["train_losses"])
    assert result["eval_loss_after"] < result["eval_loss_before"]
    # Training went through the token-count branch (Trainer passes the count to models
    # that take loss kwargs, as Llama does).
    assert any(n is not None for n in seen)

    # Both branches agree: sum / (number of label tokens) is the mean over them.
    trainer = result["trainer"]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    batch = {k: v.to(trainer.args.device) for k, v in batch.items()}
    tokens = (batch["labels"][:, 1:] != hf.IGNORE_INDEX).sum()
    with torch.no_grad():
        mean_loss = trainer.compute_loss(trainer.model, dict(batch))
        token_loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=tokens)
        half = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=2 * tokens)
    torch.testing.assert_close(token_loss, mean_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(half, mean_loss / 2, rtol=1e-5, atol=1e-6)


def test_module_autocast():
    ex = load_example("module_autocast")
    result = ex.main(["--tiny"])
    assert result["logits_dtype"] == torch.bfloat16
    assert result["loss_dtype"] == torch.float32
    ll = result["log_likelihoods"]
    assert mean(ll[-5:]) > mean(ll[:5])

    # The gradient reaching the bf16 logits is bf16, finite, and the float32 weights get one.
    torch.manual_seed(0)
    model = ex.Distiller(ex.mlp(8, 16, 10), ex.mlp(8, 16, 10),
                         ex.MoEKDLoss(return_stats=True))
    grads = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, logits = model(torch.randn(32, 8), torch.randint(10, (32,)))
    logits.register_hook(grads.append)
    loss.backward()
    assert grads[0].dtype == torch.bfloat16 and torch.isfinite(grads[0]).all()
    weight = model.student[0].weight
    assert weight.dtype == torch.float32 and weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())


def test_trl_gkd_distillation_runs_as_a_script_and_prints_finite_losses(tmp_path):
    require("trl")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "trl_gkd_distillation.py"), "--tiny",
                           "--output-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [float(v) for v in re.findall(r"^step \d+: loss (\S+)$", proc.stdout, re.M)]
    assert len(losses) == 6, proc.stdout  # --tiny runs 6 optimizer steps, one line each
    assert all(math.isfinite(v) for v in losses), losses
    assert "6 steps, losses finite" in proc.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("num_items_in_batch", [None, 37])
def test_trl_forward_kl_has_our_gradient_at_beta_zero(dtype, temperature, num_items_in_batch):
    """TRL's GKD divergence at beta=0 is the token mean of KL(softmax(t/τ) ‖ softmax(s/τ)).

    Ours with expert_strength=0, expert_weight=0 and gate_weight=1/τ² has the same gradient
    (docs/math.md, Extensions), and its value is larger by the teacher's entropy H(π)
    averaged the same way.
    """
    require("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    gen = torch.Generator().manual_seed(7)
    batch, positions, vocab = 3, 9, 50
    student = (3 * torch.randn(batch, positions, vocab, generator=gen, dtype=dtype)).requires_grad_()
    teacher = 3 * torch.randn(batch, positions, vocab, generator=gen, dtype=dtype)
    labels = torch.randint(vocab, (batch, positions), generator=gen)
    labels[0, :4] = -100            # a prompt
    labels[2, 6:] = -100            # padding

    trl_loss = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=0.0,
                                               temperature=temperature,
                                               num_items_in_batch=num_items_in_batch)
    (trl_grad,) = torch.autograd.grad(trl_loss, student)
    ours = fused_moe_kd_loss(student, teacher, labels, temperature=temperature, expert_strength=0.0,
                             expert_weight=0.0, gate_weight=1.0 / temperature**2,
                             num_items_in_batch=num_items_in_batch)
    (our_grad,) = torch.autograd.grad(ours, student)

    # float32: the kernels' rounding; float64: the reference, exact to rounding.
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (our_grad - trl_grad).abs().max() <= tol * trl_grad.abs().max()
    assert our_grad.abs().sum() > 0

    log_pi = torch.log_softmax(teacher.double() / temperature, dim=-1)
    entropy = -(log_pi.exp() * log_pi).sum(-1)[labels != -100]
    divisor = entropy.numel() if num_items_in_batch is None else num_items_in_batch
    torch.testing.assert_close(ours.double() - trl_loss.double(), entropy.sum() / divisor,
                               rtol=tol, atol=tol)


def _one_process_equals_two_ranks(example: str, tmp_path):
    """Runs ``example --tiny`` in one process and with 2 gloo ranks under torchrun, asserts that
    both save the same weights, and returns the one-process weights."""
    script = str(EXAMPLES / example)
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, script, "--tiny", "--save", str(one)], check=True, timeout=180,
                   env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    script, "--tiny", "--save", str(two)], check=True, timeout=300, env=env)
    single, distributed = torch.load(one), torch.load(two)
    assert single.keys() == distributed.keys()
    for name in single:
        assert torch.allclose(single[name], distributed[name], rtol=1e-5, atol=1e-6), name
    return single


def test_ddp_distillation_equals_one_process(tmp_path):
    """Two gloo ranks with DDP and num_items_in_batch train the same weights as one process
    on the whole batch."""
    single = _one_process_equals_two_ranks("ddp_distillation.py", tmp_path)
    # The run changed the weights: a comparison of two untouched initialisations would pass.
    _, initial = load_example("ddp_distillation").make_models(16, 50)
    assert not torch.allclose(initial.weight, single["weight"], atol=1e-3)


def test_tensor_parallel_distillation_equals_one_process(tmp_path):
    """Two gloo ranks, each holding its rows of the output layers (26 and 25 of 51), train the
    same trunk and output layer as one process on the whole vocabulary."""
    single = _one_process_equals_two_ranks("tensor_parallel_distillation.py", tmp_path)
    # The run changed the weights: a comparison of two untouched initialisations would pass.
    _, (trunk, head) = load_example("tensor_parallel_distillation").make_models(16, 32, 51)
    assert not torch.allclose(head.weight, single["head.weight"], atol=1e-3)
    assert not torch.allclose(trunk[0].weight, single["trunk.0.weight"], atol=1e-3)


def test_topk_offline_distillation_learns_from_the_stored_file(tmp_path):
    result = load_example("topk_offline_distillation").main(["--tiny", "--file", str(tmp_path / "top_k.pt")])
    losses = result["losses"]
    assert all(math.isfinite(v) for v in losses)
    assert mean(losses[-10:]) < mean(losses[:10])
    # 50 classes: chance is 0.02. The student sees the teacher only through the file.
    assert result["teacher_accuracy"] > 0.4
    assert result["student_accuracy"] > 0.2
    assert result["file_bytes"] < result["dense_bytes"] / 4
