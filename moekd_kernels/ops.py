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
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .backends import BACKENDS
from .options import MoEKDOptions
from .reference import accumulation_dtype


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
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """student (N, C), teacher (L, N, C), target (N,) → (loss, log_likelihood (N,), agreement (N,), grad).

    ``loss`` is reduced as ``reduction`` says (0-dim for "mean"/"sum", (N,) for "none"),
    and ``grad`` (N, C) is its gradient with respect to ``student``.
    """
    opts = MoEKDOptions(tuple(temperatures), tuple(expert_strengths), tuple(level_weights),
                        gate_weight, expert_weight, ignore_index)
    num_valid: Optional[Tensor] = None
    grad_scale: Optional[Tensor] = None
    if reduction == "mean":
        # On the device: no host sync. 0 valid rows → 0 / 1 = 0, never NaN.
        num_valid = (target != ignore_index).sum().clamp_min(1)
        grad_scale = 1.0 / num_valid.to(accumulation_dtype(student.dtype))
    loss, log_likelihood, agreement, grad = BACKENDS[backend].forward(student, teacher, target, opts,
                                                                      grad_scale)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / num_valid.to(loss.dtype)
    return loss, log_likelihood, agreement, grad


@moe_kd_loss.register_fake
def _moe_kd_loss_fake(student, teacher, target, temperatures, expert_strengths, level_weights,
                      gate_weight, expert_weight, ignore_index, backend, reduction):
    num_rows = student.shape[0]
    acc = accumulation_dtype(student.dtype)
    loss = student.new_empty((num_rows,) if reduction == "none" else (), dtype=acc)
    log_likelihood = student.new_empty((num_rows,), dtype=acc)
    agreement = student.new_empty((num_rows,), dtype=acc)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    return loss, log_likelihood, agreement, grad


def _setup_context(ctx, inputs, output):
    _, log_likelihood, agreement, grad = output
    ctx.mark_non_differentiable(log_likelihood, agreement, grad)
    ctx.set_materialize_grads(False)  # never build N×C zeros for the unused outputs
    ctx.save_for_backward(grad)


def _compiling() -> bool:
    # Not always True while AOTAutograd traces backward: torch 2.11 (the H100 run)
    # reached the eager branch there, hence the traceable op below.
    return torch.compiler.is_compiling()


def _backward(ctx, grad_loss, _grad_ll, _grad_agreement, _grad_grad):
    if grad_loss is None:
        return (None,) * 11
    (grad,) = ctx.saved_tensors
    # One factor per row: a 0-dim grad_loss ("mean"/"sum") is broadcast, stride 0.
    per_row = grad_loss.expand(grad.shape[0])
    if _compiling():
        # AOTAutograd functionalises backward anyway (and rejects mutating a
        # buffer the graph may also return), so write the plain product.
        # The product in float32 (the factor unrounded), as the eager kernel forms it.
        return ((grad * per_row.unsqueeze(-1)).to(grad.dtype),) + (None,) * 10
    # Scaling in place keeps one N×C buffer alive instead of two. As a registered
    # op that mutates ``grad`` it bumps the version counter (so a second backward
    # through the same graph raises PyTorch's usual "modified by an inplace
    # operation" error instead of returning a twice-scaled gradient), and graph
    # tracers that reach this branch see an op with a fake implementation rather
    # than a raw kernel launch.
    scale_rows_(grad, per_row)
    return (grad,) + (None,) * 10


# Rows per block when a low-precision gradient is scaled on the CPU (about 1M elements).
_CPU_BLOCK_ELEMENTS = 1 << 20


@torch.library.custom_op("moekd_kernels::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: Tensor, scale: Tensor) -> None:
    """grad[i, :] *= scale[i], in place, with no N×C temporaries; rows whose factor is 1
    are left as they are (on the GPU the kernel checks, so the host never reads a factor)."""
    if scale.numel() == 0:
        return
    if grad.device.type == "cuda" and BACKENDS["triton"].unavailable_reason("cuda") is None:
        from .triton_backend import scale_rows_ as triton_scale_rows_

        triton_scale_rows_(grad, scale)
        return
    if grad.device.type == "cpu" and bool((scale == 1).all()):  # a host tensor: no sync
        return
    if scale.stride(0) == 0:
        # "mean"/"sum": one value broadcast to every row. A 0-dim factor keeps the
        # product in one pass, in float32 arithmetic on the CPU, for any gradient dtype.
        grad.mul_(scale[0])
        return
    scale = scale.unsqueeze(-1)
    if grad.device.type != "cpu" or grad.dtype == scale.dtype:
        grad.mul_(scale)
        return
    # A bf16/fp16 tensor times a float32 column makes CPU PyTorch upcast the whole
    # gradient through float32 copies; row blocks bound those to one block.
    rows = max(1, _CPU_BLOCK_ELEMENTS // max(grad.shape[1], 1))
    for start in range(0, grad.shape[0], rows):
        grad[start:start + rows].mul_(scale[start:start + rows])


@scale_rows_.register_fake
def _scale_rows_fake(grad, scale):
    return None


moe_kd_loss.register_autograd(_backward, setup_context=_setup_context)
