"""The registered op and its autograd: the glue every backend goes through.

``moekd_kernels::moe_kd_loss`` is an opaque ``torch.library.custom_op``: it
calls the chosen backend, which returns the per-row loss, the two per-row
stats and the gradient, computed in the forward pass; the op then reduces the
loss. A fake (meta) implementation gives torch.compile the output shapes, so a
compiled training step keeps the whole call in one graph whatever the
backend (C++, CUDA or Triton) does inside.

Why one opaque custom_op rather than ``torch.library.triton_op`` + ``wrap_triton``
for the GPU path: the op has one implementation per backend (reference, C++,
CUDA, Triton, and Triton's CPU interpreter in the tests), and only one of them
could be a triton_op. What triton_op adds, Inductor seeing the launch, buys
nothing here: Inductor does not fuse a user kernel with its neighbours, and the
kernel runs for milliseconds at the sizes that matter against microseconds of
dispatch. The Triton launch has no host sync and allocates with torch.empty.

Why the op reduces the loss itself: the gradient it saves is then already the
gradient of the returned loss ("mean" passes 1/n_valid, a device scalar, into
the kernel), so backward only scales it by grad_output, and skips that N×C
pass where grad_output is 1, as it is for ``loss.backward()``. The check runs
on the device (the GPU scaling kernel returns early), never as a host sync.

What the op's body does besides calling the backend, and why there: it checks CPU
targets (and a CPU ``num_items_in_batch``), because the body runs eagerly even inside
a compiled graph, so a compiled call raises the eager ValueError instead of tracing
past it. ``need_grad=False`` (no_grad, inference_mode, logits without grad) skips the
gradient pass; the gradient output is then an empty (0,) placeholder. Backward gives
a first-order gradient only, and is refused, in the library's words, for a double
backward or a second backward through the same result.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .backends import BACKENDS
from .options import MoEKDOptions, check_target_values
from .reference import accumulation_dtype
from .scaling import scale_rows_
from .teachers import TopKRows

# Raised by backward in the library's own words, instead of a silently wrong or a raw
# PyTorch error; the tests match these texts.
DOUBLE_BACKWARD_MESSAGE = (
    "moekd_kernels: fused_moe_kd_loss gives a first-order gradient only: its backward "
    "returns the gradient computed in the forward pass, which has no graph of its own, so a "
    "double backward (create_graph=True, e.g. a gradient penalty through this loss) would "
    "silently miss the loss's second-order term. Call backward / autograd.grad without "
    "create_graph=True through this loss."
)
SECOND_BACKWARD_MESSAGE = (
    "moekd_kernels: backward ran twice through the same fused_moe_kd_loss result "
    "(retain_graph=True). The loss keeps its gradient from the forward pass and the first "
    "backward consumed it (scaled it in place by grad_output), so retain_graph=True is not "
    "supported through this loss: recompute the loss before each backward."
)


def _check_num_items(num_items_in_batch: Tensor) -> None:
    """A CPU count is read here, in the op's body, which runs eagerly even in a compiled
    graph; a GPU count is never read on the host (no sync): it is only divided by."""
    if num_items_in_batch.device.type != "cpu" or torch.compiler.is_compiling():
        return
    value = num_items_in_batch.item()
    if not value > 0 or value == float("inf"):
        raise ValueError(
            "num_items_in_batch must be > 0 and finite (the token count of the whole batch), "
            f"got {value}"
        )


@torch.library.custom_op("moekd_kernels::moe_kd_loss", mutates_args=())
def moe_kd_loss(
    student: Tensor,
    teacher: Tensor,
    target: Tensor,
    temperatures: List[float],
    expert_strengths: List[float],
    level_weights: List[float],
    gate_weight: float,
    expert_weight: float,
    ignore_index: int,
    backend: str,
    reduction: str,
    need_grad: bool = True,
    num_items_in_batch: Optional[Tensor] = None,
    teacher_indices: Optional[Tensor] = None,
    teacher_rest: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """student (N, C), teacher (L, N, C), target (N,) int64 → (loss, log_likelihood (N,), agreement (N,), grad).

    ``loss`` is reduced as ``reduction`` says (0-dim for "mean"/"sum", (N,) for "none");
    "mean" divides by ``num_items_in_batch`` (a 0-dim tensor) when given, else by the
    number of non-ignored rows. ``grad`` (N, C) is its gradient with respect to
    ``student``, or an empty (0,) tensor when ``need_grad`` is False (no gradient pass).
    With ``teacher_indices`` (L, N, K) and ``teacher_rest`` (L, N) the teacher is a top-k
    one (``teachers.TopKRows``) whose values (L, N, K) ``teacher`` holds.
    """
    check_target_values(target, student.shape[1], ignore_index)
    opts = MoEKDOptions(tuple(temperatures), tuple(expert_strengths), tuple(level_weights),
                        gate_weight, expert_weight, ignore_index)
    divisor = loss_divisor(target, ignore_index, reduction, num_items_in_batch)
    grad_scale = None if divisor is None else 1.0 / divisor.to(accumulation_dtype(student.dtype))
    if teacher_indices is not None:  # a top-k teacher: ``teacher`` holds its values
        teacher = TopKRows(teacher_indices, teacher, teacher_rest)
    loss, log_likelihood, agreement, grad = BACKENDS[backend].forward(student, teacher, target, opts,
                                                                      grad_scale, need_grad)
    return reduced_outputs(student, loss, log_likelihood, agreement, grad, reduction, divisor, need_grad)


def loss_divisor(target: Tensor, ignore_index: int, reduction: str,
                 num_items_in_batch: Optional[Tensor]) -> Optional[Tensor]:
    """What the summed loss is divided by: ``num_items_in_batch`` (checked here when it is
    on the CPU), else for "mean" the count of non-ignored rows, on the device (no host
    sync; 0 valid rows → 0 / 1 = 0, never NaN); None for "sum" and "none"."""
    if reduction != "mean":
        return None
    if num_items_in_batch is not None:
        _check_num_items(num_items_in_batch)
        return num_items_in_batch
    return (target != ignore_index).sum().clamp_min(1)


def reduced_outputs(student: Tensor, loss: Tensor, log_likelihood: Tensor, agreement: Tensor,
                    grad: Optional[Tensor], reduction: str, divisor: Optional[Tensor], need_grad: bool):
    """The op's outputs from a backend's per-row results: the loss reduced, and an empty
    (0,) placeholder for the gradient that was not computed."""
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / divisor.to(loss.dtype)
    if not need_grad:
        grad = student.new_empty((0,))
    return loss, log_likelihood, agreement, grad


def fake_outputs(student: Tensor, reduction: str, need_grad: bool):
    """The output shapes and dtypes of an op built like ``moe_kd_loss``, for its fake."""
    num_rows = student.shape[0]
    acc = accumulation_dtype(student.dtype)
    loss = student.new_empty((num_rows,) if reduction == "none" else (), dtype=acc)
    log_likelihood = student.new_empty((num_rows,), dtype=acc)
    agreement = student.new_empty((num_rows,), dtype=acc)
    grad_shape = student.shape if need_grad else (0,)
    grad = torch.empty(grad_shape, dtype=student.dtype, device=student.device)
    return loss, log_likelihood, agreement, grad


@moe_kd_loss.register_fake
def _moe_kd_loss_fake(student, teacher, target, temperatures, expert_strengths, level_weights,
                      gate_weight, expert_weight, ignore_index, backend, reduction, need_grad=True,
                      num_items_in_batch=None, teacher_indices=None, teacher_rest=None):
    return fake_outputs(student, reduction, need_grad)


def _setup_context(ctx, inputs, output):
    _, log_likelihood, agreement, grad = output
    ctx.mark_non_differentiable(log_likelihood, agreement, grad)
    ctx.set_materialize_grads(False)  # never build N×C zeros for the unused outputs
    ctx.save_for_backward(grad)
    ctx.consumed = False


def _compiling() -> bool:
    # Not always True while AOTAutograd traces backward: torch 2.11 (the H100 run)
    # reached the eager branch there, hence the traceable op below.
    return torch.compiler.is_compiling()


def _student_gradient(ctx, grad_loss) -> Optional[Tensor]:
    if grad_loss is None:
        return None
    if torch.is_grad_enabled() and not _compiling():
        # Grad mode is on in backward exactly when autograd builds a graph of it.
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
    if ctx.consumed:
        # Checked before the saved gradient is read: PyTorch's own version-counter
        # error would say "modified by an inplace operation" without saying why.
        raise RuntimeError(SECOND_BACKWARD_MESSAGE)
    (grad,) = ctx.saved_tensors
    # One factor per row: a 0-dim grad_loss ("mean"/"sum") is broadcast, stride 0.
    per_row = grad_loss.expand(grad.shape[0])
    if _compiling():
        # AOTAutograd functionalises backward anyway (and rejects mutating a
        # buffer the graph may also return), so write the plain product.
        # The product in float32 (the factor unrounded), as the eager kernel forms it.
        return (grad * per_row.unsqueeze(-1)).to(grad.dtype)
    # Scaling in place keeps one N×C buffer alive instead of two. As a registered
    # op that mutates ``grad`` it bumps the version counter (a second backward through
    # the same graph could not silently return a twice-scaled gradient even without
    # the check above), and graph tracers that reach this branch see an op with a fake
    # implementation rather than a raw kernel launch.
    ctx.consumed = True
    scale_rows_(grad, per_row)
    return grad


def register_first_order_autograd(op, num_inputs: int) -> None:
    """The autograd of an op built like ``moe_kd_loss``: outputs (loss, log_likelihood,
    agreement, grad) with ``grad`` the gradient of ``loss`` with respect to the first
    input; backward scales it by grad_output."""

    def backward(ctx, grad_loss, _grad_ll, _grad_agreement, _grad_grad):
        return (_student_gradient(ctx, grad_loss),) + (None,) * (num_inputs - 1)

    op.register_autograd(backward, setup_context=_setup_context)


register_first_order_autograd(moe_kd_loss, num_inputs=15)
