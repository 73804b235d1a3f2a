"""Vocab-parallel MoE-KD over spawned gloo groups: every rank holds a class slice.

Each world size runs in one spawn (starting processes costs seconds); the
workers check their own results against the float64 oracle of the unsharded
rows and raise on a mismatch, which the parent re-raises. Every spawn runs under
a timeout: a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 120


def _run(worker, world: int, *args) -> None:
    # A file rendezvous: a free TCP port picked here could be taken by another process
    # before the workers bind it.
    rendezvous = os.path.join(tempfile.mkdtemp(prefix="moekd-gloo-"), "store")
    context = mp.start_processes(worker, args=(world, rendezvous) + args, nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"{world}-process run did not finish in {TIMEOUT_S} s (a hang?)")


def _init(rank: int, world: int, rendezvous: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    # Imported before the group exists: importing torch._dynamo (which the package does)
    # after init_process_group keeps the group alive past destroy_process_group, and its
    # gloo threads then abort the process at exit about one run in four.
    import moekd_kernels  # noqa: F401

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)


def _finish() -> None:
    """Destroy the group with nothing left holding it (see _gloo_threads)."""
    gc.collect()           # pytest.raises keeps each error in a cycle with the checks' frames
    torch._dynamo.reset()  # compiled code's guards hold the group
    dist.destroy_process_group()


def _gloo_threads():
    """gloo's threads in this process: a group that something still holds keeps them past
    destroy_process_group, and their teardown at interpreter exit aborts the process."""
    tasks = os.listdir("/proc/self/task")
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in tasks]
    return [name for name in names if "gloo" in name]


def _slices(num_classes: int, widths):
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    assert offsets[-1] == num_classes
    return offsets


# (world size) -> slice widths of an 11-class row: uneven, with a 1-class slice at three ranks.
WIDTHS = {1: [11], 2: [5, 6], 3: [1, 6, 4]}


def _sharded_backends():
    """The backends with phase functions that can run here (under CI, every one must)."""
    from moekd_kernels.backends import BACKENDS

    names = []
    for name, backend in BACKENDS.items():
        if backend.phases is None:
            continue
        reason = backend.unavailable_reason("cpu")
        if reason is not None and os.environ.get("CI") == "true":
            pytest.fail(f"backend {name!r} has phase functions but cannot run: {reason}")
        if reason is None:
            names.append(name)
    assert "reference" in names
    return names


def _conformance_worker(rank: int, world: int, rendezvous: str, backends) -> None:
    _init(rank, world, rendezvous)
    for backend in backends:
        _check_conformance(rank, world, backend)
        _check_sharded_top_k_teacher(rank, _slices(11, WIDTHS[world]), backend)
        _check_sharded_fused_linear(rank, world, backend)
        _check_usage_modes(rank, world, backend)
    _finish()


def _check_conformance(rank: int, world: int, backend: str) -> None:
    from moekd_kernels import fused_moe_kd_loss, vocab_parallel
    from oracle import Case, float64_oracle

    num_classes, widths = 11, WIDTHS[world]
    offsets = _slices(num_classes, widths)
    group = dist.group.WORLD
    for seed, (dtype, num_levels, reduction) in enumerate([
        (torch.float32, 1, "none"), (torch.float32, 2, "mean"), (torch.float32, 2, "sum"),
        (torch.bfloat16, 1, "none"), (torch.float32, 1, "mean"),
    ]):
        g = torch.Generator().manual_seed(seed)
        student = (3 * torch.randn(2, 5, num_classes, generator=g)).to(dtype)
        teacher_shape = (2, 5, num_classes) if num_levels == 1 else (num_levels, 2, 5, num_classes)
        teacher = (3 * torch.randn(teacher_shape, generator=g)).to(dtype)
        target = torch.randint(0, num_classes, (2, 5), generator=g)
        target.view(-1)[:world] = torch.tensor(offsets[1:world + 1]) - 1  # last class of each slice
        target.view(-1)[world:2 * world] = torch.tensor(offsets[:world])   # first class of each slice
        target.view(-1)[-2] = -100
        options = dict(temperature=[2.0, 3.0][:num_levels] if num_levels > 1 else 2.0,
                       expert_strength=1.5, gate_weight=0.7, expert_weight=1.2)

        lo, hi = offsets[rank], offsets[rank + 1]
        shard = student[..., lo:hi].clone().requires_grad_(True)
        loss, stats = fused_moe_kd_loss(shard, teacher[..., lo:hi], target, reduction=reduction,
                                        process_group=group, return_stats=True, backend=backend, **options)
        grad_out = (torch.rand(target.shape, generator=g, dtype=torch.float64) + 0.5
                    if reduction == "none" else torch.tensor(2.0, dtype=torch.float64))
        loss.backward(grad_out.to(loss.dtype))
        comm = vocab_parallel.last_counts
        assert comm.calls == 4, comm.calls                              # 1 gather + 3 all-reduces
        assert comm.bytes_reduced == target.numel() * 4 * (5 + 6 * num_levels), comm.bytes_reduced

        exp_loss, exp_grad, exp_ll, exp_agree = float64_oracle(Case(student, teacher, target, options))
        valid = (target.reshape(-1) != -100)
        if reduction == "mean":
            exp_loss, scale = exp_loss.sum() / valid.sum(), 2.0 / valid.sum()
        elif reduction == "sum":
            exp_loss, scale = exp_loss.sum(), 2.0
        else:
            scale = grad_out.reshape(-1, 1)
        exp_grad = (exp_grad * scale)[:, lo:hi]
        # The loss and stats are float32 sums of exactly representable inputs whatever the
        # dtype; the gradient is rounded once to bf16 (8 bits) in the bf16 case.
        grad_tol = 1e-5 if dtype == torch.float32 else 2 ** -8
        for name, got, want, tol in (
            ("loss", loss, exp_loss, 1e-5),
            ("log_likelihood", stats.log_likelihood, exp_ll, 1e-5),
            ("agreement", stats.agreement, exp_agree, 1e-5),
            ("grad", shard.grad.reshape(-1, hi - lo), exp_grad, grad_tol),
        ):
            got = got.detach().double().reshape(-1)
            want = want.double().reshape(-1)
            bound = tol * want.abs().max().clamp_min(1e-30) if name == "grad" else tol * want.abs() + 1e-7
            err = (got - want).abs()
            assert bool((err <= bound).all()), \
                f"{backend}: world {world} rank {rank} seed {seed} {name}: max err {float(err.max()):.3g}"
        assert shard.grad.dtype == dtype


def _check_sharded_top_k_teacher(rank: int, offsets, backend: str) -> None:
    """A TopKTeacher holds global class indices, the same on every rank."""
    from moekd_kernels import TopKTeacher, fused_moe_kd_loss

    g = torch.Generator().manual_seed(11)
    num_classes = offsets[-1]
    student = 3 * torch.randn(6, num_classes, generator=g)
    teacher_logits = 3 * torch.randn(6, num_classes, generator=g)
    target = torch.randint(0, num_classes, (6,), generator=g)
    indices = teacher_logits.topk(4, dim=-1).indices
    values = torch.log_softmax(teacher_logits, -1).gather(1, indices)
    teacher = TopKTeacher(indices, values, "logprobs")
    lo, hi = offsets[rank], offsets[rank + 1]
    shard = student[:, lo:hi].clone().requires_grad_(True)
    loss = fused_moe_kd_loss(shard, teacher, target, process_group=dist.group.WORLD, reduction="sum",
                             backend=backend)
    loss.backward()
    full = student.clone().requires_grad_(True)
    expected = fused_moe_kd_loss(full, teacher, target, reduction="sum")
    expected.backward()
    assert abs(float(loss) - float(expected)) <= 1e-5 * abs(float(expected)), (float(loss), float(expected))
    bound = 1e-5 * full.grad.abs().max()
    assert bool(((shard.grad - full.grad[:, lo:hi]).abs() <= bound).all())
    # The module form takes the group at construction and gives the same result.
    from moekd_kernels import MoEKDLoss

    module = MoEKDLoss(reduction="sum", backend=backend, process_group=dist.group.WORLD)
    assert torch.equal(module(student[:, lo:hi], teacher, target), loss.detach())


def _check_usage_modes(rank: int, world: int, backend: str) -> None:
    """no_grad and inference_mode give the training call's loss and stats; every integer
    target dtype gives the int64 result; a second backward through one result is refused."""
    from moekd_kernels import fused_moe_kd_loss

    offsets = _slices(11, WIDTHS[world])
    lo, hi = offsets[rank], offsets[rank + 1]
    g = torch.Generator().manual_seed(21)
    student, teacher = 3 * torch.randn(6, 11, generator=g), 3 * torch.randn(6, 11, generator=g)
    target = torch.tensor([0, 10, 5, -100, 3, offsets[1] if world > 1 else 7])

    def call(shard, labels=target):
        return fused_moe_kd_loss(shard, teacher[:, lo:hi], labels, process_group=dist.group.WORLD,
                                 backend=backend, return_stats=True)

    shard = student[:, lo:hi].clone().requires_grad_(True)
    loss, stats = call(shard)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            other, other_stats = call(shard)
        assert not other.requires_grad
        assert torch.equal(other, loss.detach()) and torch.equal(other_stats.agreement, stats.agreement)
    for dtype in (torch.int32, torch.int16, torch.int8):
        assert torch.equal(call(shard.detach(), target.to(dtype))[0], loss.detach()), dtype
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def _check_sharded_fused_linear(rank: int, world: int, backend: str) -> None:
    """fused_linear_moe_kd_loss with each rank holding its rows of the output weights: the
    loss and stats of the whole vocabulary, this rank's weight and bias gradients, and the
    whole gradient of the replicated hidden states."""
    from moekd_kernels import FusedLinearMoEKDLoss, fused_linear_moe_kd_loss, vocab_parallel
    from oracle import Case, float64_oracle

    vocab, hidden, teacher_hidden_size = 11, 6, 5
    offsets = _slices(vocab, WIDTHS[world])
    lo, hi = offsets[rank], offsets[rank + 1]
    for seed, (dtype, heads, reduction, chunk_size) in enumerate([
        (torch.float32, 2, "mean", 3 + rank),    # chunks of 3 rows: the ranks agree on the fewest
        (torch.float32, 1, "none", None),        # backward runs the chunks again
        (torch.bfloat16, 1, "sum", 4),
    ]):
        g = torch.Generator().manual_seed(100 + seed)
        h_s = torch.randn(2, 5, hidden, generator=g).to(dtype)
        w_s = torch.randn(vocab, hidden, generator=g).to(dtype)
        b_s = torch.randn(vocab, generator=g).to(dtype)
        lead = (heads, 2, 5) if heads > 1 else (2, 5)
        h_t = torch.randn(lead + (teacher_hidden_size,), generator=g).to(dtype)
        w_t = torch.randn(((heads,) if heads > 1 else ()) + (vocab, teacher_hidden_size), generator=g).to(dtype)
        target = torch.randint(0, vocab, (2, 5), generator=g)
        target.view(-1)[:world] = torch.tensor(offsets[1:world + 1]) - 1
        target.view(-1)[-2] = -100
        options = dict(temperature=[2.0, 3.0][:heads] if heads > 1 else 2.0, expert_strength=1.5,
                       gate_weight=0.7, expert_weight=1.2)

        hidden_in = h_s.clone().requires_grad_(True)
        weight = w_s[lo:hi].clone().requires_grad_(True)
        bias = b_s[lo:hi].clone().requires_grad_(True)
        loss, stats = fused_linear_moe_kd_loss(
            hidden_in, weight, h_t, w_t[..., lo:hi, :], target, student_bias=bias, chunk_size=chunk_size,
            reduction=reduction, backend=backend, return_stats=True, process_group=dist.group.WORLD,
            **options)
        comm = vocab_parallel.last_counts
        grad_out = (torch.rand(target.shape, generator=g, dtype=torch.float64) + 0.5
                    if reduction == "none" else torch.tensor(2.0, dtype=torch.float64))
        loss.backward(grad_out.to(loss.dtype))
        if reduction == "mean":
            # 1 agreement + 3 all-reduces per chunk of 3 (9 valid rows) + 1 for grad_hidden.
            assert comm.calls == 1 + 3 * 3 + 1, comm.calls
            assert comm.bytes_reduced == 9 * 4 * (5 + 6 * heads) + 10 * hidden * 4, comm.bytes_reduced

        s64 = h_s.double().reshape(-1, hidden) @ w_s.double().T + b_s.double()
        w_t64 = w_t.double().transpose(-1, -2)
        t64 = (h_t.double() @ (w_t64[:, None] if heads > 1 else w_t64)).reshape(heads, -1, vocab)
        exp_loss, exp_grad, exp_ll, exp_agree = float64_oracle(
            Case(s64, t64 if heads > 1 else t64[0], target.reshape(-1), options))
        valid = target.reshape(-1) != -100
        if reduction == "mean":
            exp_loss, scale = exp_loss.sum() / valid.sum(), 2.0 / valid.sum()
        elif reduction == "sum":
            exp_loss, scale = exp_loss.sum(), 2.0
        else:
            scale = grad_out.reshape(-1, 1)
        grad_logits = exp_grad * scale
        hidden_2d = h_s.double().reshape(-1, hidden)
        expected = {
            "loss": exp_loss, "log_likelihood": exp_ll, "agreement": exp_agree,
            "grad_hidden": grad_logits @ w_s.double(),
            "grad_weight": grad_logits[:, lo:hi].T @ hidden_2d,
            "grad_bias": grad_logits[:, lo:hi].sum(0),
        }
        got = {"loss": loss, "log_likelihood": stats.log_likelihood, "agreement": stats.agreement,
               "grad_hidden": hidden_in.grad, "grad_weight": weight.grad, "grad_bias": bias.grad}
        # float32: rounding of float32 GEMMs and sums; bf16: the logits are rounded to bf16
        # (8 bits) by the GEMM before the loss reads them.
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        for name, want in expected.items():
            have = got[name].detach().double().reshape(-1)
            want = want.double().reshape(-1)
            err = (have - want).abs().max() / want.abs().max().clamp_min(1e-30)
            assert err <= tol, f"{backend}: world {world} rank {rank} seed {seed} {name}: rel err {float(err):.3g}"
        for name in ("grad_hidden", "grad_weight", "grad_bias"):
            assert got[name].dtype == dtype, (name, got[name].dtype)

    # The module form takes the group at construction.
    module = FusedLinearMoEKDLoss(reduction="sum", backend=backend, process_group=dist.group.WORLD, **options)
    by_module = module(h_s.float(), w_s[lo:hi].float(), h_t.float(), w_t[lo:hi].float(), target)
    by_function = fused_linear_moe_kd_loss(h_s.float(), w_s[lo:hi].float(), h_t.float(), w_t[lo:hi].float(),
                                           target, reduction="sum", backend=backend,
                                           process_group=dist.group.WORLD, **options)
    assert torch.equal(by_module, by_function)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_equals_unsharded(world):
    _run(_conformance_worker, world, _sharded_backends())


def _bad_input_worker(rank: int, world: int, rendezvous: str) -> None:
    _init(rank, world, rendezvous)
    for which in ("target", "shape", "options"):
        _check_bad_input(rank, world, which)
    for which in ("target", "shape", "needs grad"):
        _check_bad_fused_linear_input(rank, world, which)
    gc.collect()  # the pytest.raises above keep their errors in cycles
    # A caller that catches the error plainly leaves nothing holding the group: the
    # library's frames drop the exceptions they raise.
    from moekd_kernels import fused_moe_kd_loss

    for teacher_width in (3, 2 if rank == 1 else 3):   # the target, then this rank's own shape
        try:
            fused_moe_kd_loss(torch.randn(4, 3), torch.randn(4, teacher_width),
                              torch.tensor([0, 1, 6 if rank == 1 else 5, -100]), process_group=dist.group.WORLD)
        except ValueError:
            pass
        else:
            raise AssertionError("bad input was not refused")
    dist.destroy_process_group()
    assert not _gloo_threads(), f"rank {rank}: a caught error kept the group alive: {_gloo_threads()}"


def _assert_raises_and_nobody_is_stuck(error, expected: str, world: int, call) -> None:
    """``call()`` raises ``error`` with ``expected`` in its message here, and afterwards the
    group still works: no rank waits in a collective."""
    with pytest.raises(error) as info:
        call()
    assert expected in str(info.value), str(info.value)
    flag = torch.ones(1)
    dist.all_reduce(flag)
    assert flag.item() == world


def _check_bad_input(rank: int, world: int, which: str) -> None:
    from moekd_kernels import fused_moe_kd_loss

    student = torch.randn(4, 3)
    teacher = torch.randn(4, 3)
    target = torch.tensor([0, 1, 5, -100])  # 6 classes over two ranks of 3
    if rank == 1:
        if which == "target":
            target = torch.tensor([0, 1, 6, -100])       # out of range on this rank only
        elif which == "shape":
            teacher = torch.randn(4, 2)                  # rejected by this rank's own checks
    temperature = 3.0 if (which == "options" and rank == 1) else 2.0
    expected = {"target": "target values must be in [0, 6)",
                "shape": "teacher_logits must have" if rank == 1 else "rank(s) [1] rejected",
                "options": "every rank must pass the same options"}[which]
    _assert_raises_and_nobody_is_stuck(
        ValueError, expected, world,
        lambda: fused_moe_kd_loss(student.requires_grad_(), teacher, target, temperature=temperature,
                                  process_group=dist.group.WORLD))


def _check_bad_fused_linear_input(rank: int, world: int, which: str) -> None:
    from moekd_kernels import fused_linear_moe_kd_loss

    hidden = torch.randn(4, 5, requires_grad=not (which == "needs grad" and rank == 1))
    weight = torch.randn(3, 5, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(4, 2), torch.randn(3, 2)
    target = torch.tensor([0, 1, 5, -100])  # 6 classes over two ranks of 3
    if rank == 1 and which == "target":
        target = torch.tensor([0, 1, 6, -100])
    if rank == 1 and which == "shape":
        teacher_weight = torch.randn(2, 2)       # not the student's 3 rows
    expected = {"target": "target values must be in [0, 6)",
                "shape": "teacher_weight must have V=3 rows" if rank == 1 else "rank(s) [1] rejected",
                # One rank would sum student_hidden's gradient over the group, the other not.
                "needs grad": "every rank must pass the same options"}[which]
    _assert_raises_and_nobody_is_stuck(
        ValueError, expected, world,
        lambda: fused_linear_moe_kd_loss(hidden, weight, teacher_hidden, teacher_weight, target,
                                         process_group=dist.group.WORLD))


def test_bad_input_on_one_rank_makes_every_rank_raise():
    """Bad target, shape or options on rank 1 only: both ranks raise, and neither hangs."""
    _run(_bad_input_worker, 2)


def test_auto_picks_the_first_backend_with_phase_functions():
    from moekd_kernels.backends import BACKENDS, resolve_sharded_backend

    available = [n for n in ("cpu", "reference") if BACKENDS[n].unavailable_reason("cpu") is None]
    assert resolve_sharded_backend("auto", torch.device("cpu")) == available[0]
    assert resolve_sharded_backend("auto", torch.device("cpu"), torch.float64) == "reference"
    assert resolve_sharded_backend("auto", torch.device("cpu"), top_k_teacher=True) == available[0]
    for name in ("triton", "cuda"):
        if BACKENDS[name].phases is None:
            with pytest.raises(ValueError, match=f"backend='{name}' does not take a process_group"):
                resolve_sharded_backend(name, torch.device("cpu"))


def _compile_worker(rank: int, world: int, rendezvous: str) -> None:
    _init(rank, world, rendezvous)
    from moekd_kernels import fused_moe_kd_loss

    group = dist.group.WORLD
    offsets = _slices(11, WIDTHS[world])
    lo, hi = offsets[rank], offsets[rank + 1]

    def step(student, teacher, target):
        return fused_moe_kd_loss(student, teacher, target, process_group=group, temperature=2.0) * 1.5

    for dynamic in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
        for num_rows in ((6, 9) if dynamic else (6,)):
            g = torch.Generator().manual_seed(num_rows)
            student = 3 * torch.randn(num_rows, 11, generator=g)
            teacher = 3 * torch.randn(num_rows, 11, generator=g)
            target = torch.randint(0, 11, (num_rows,), generator=g)
            target[1] = -100
            eager_shard = student[:, lo:hi].clone().requires_grad_(True)
            eager = step(eager_shard, teacher[:, lo:hi], target)
            eager.backward()
            shard = student[:, lo:hi].clone().requires_grad_(True)
            loss = compiled(shard, teacher[:, lo:hi], target)
            loss.backward()
            assert torch.allclose(loss, eager, rtol=1e-6, atol=0), (dynamic, float(loss), float(eager))
            assert torch.allclose(shard.grad, eager_shard.grad, rtol=1e-6, atol=1e-9), dynamic

    # The fused linear loss over a sharded output layer, compiled.
    from moekd_kernels import fused_linear_moe_kd_loss

    def linear_step(hidden, weight, teacher_hidden, teacher_weight, target):
        return fused_linear_moe_kd_loss(hidden, weight, teacher_hidden, teacher_weight, target,
                                        chunk_size=4, process_group=group)

    torch._dynamo.reset()
    compiled = torch.compile(linear_step, fullgraph=True)
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(7, 6, generator=g), torch.randn(11, 6, generator=g)
    teacher_hidden, teacher_weight = torch.randn(7, 3, generator=g), torch.randn(11, 3, generator=g)
    target = torch.randint(0, 11, (7,), generator=g)
    grads = []
    for fn in (linear_step, compiled):
        leaves = (hidden.clone().requires_grad_(True), weight[lo:hi].clone().requires_grad_(True))
        loss = fn(*leaves, teacher_hidden, teacher_weight[lo:hi], target)
        loss.backward()
        grads.append((loss.detach(),) + tuple(leaf.grad for leaf in leaves))
    for eager_value, compiled_value in zip(*grads):
        assert torch.allclose(compiled_value, eager_value, rtol=1e-6, atol=1e-9)

    # Bad input on rank 1 only, found while rank 1 traces: both ranks raise, neither hangs.
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    student = torch.randn(4, hi - lo, requires_grad=True)
    teacher = torch.randn(4, hi - lo + (1 if rank == 1 else 0))
    # Dynamo wraps the traced rank's ValueError in an error of its own.
    _assert_raises_and_nobody_is_stuck(
        Exception, "teacher_logits must have" if rank == 1 else "rank(s) [1] rejected", world,
        lambda: compiled(student, teacher, torch.tensor([0, 1, 5, -100])))
    _finish()


def test_compiled_sharded_loss_equals_eager():
    """torch.compile(fullgraph=True), static and dynamic shapes: the loss and each rank's
    gradient equal eager's; bad input on one rank while compiling raises everywhere."""
    _run(_compile_worker, 2)
