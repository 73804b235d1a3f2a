"""The registered op and its autograd: the glue every backend goes through.

``moekd_kernels::moe_kd_rows`` is an opaque ``torch.library.custom_op``: it
calls the chosen backend, which returns the per-row loss, the two per-row
stats and the gradient of the per-row loss, computed in the forward pass.
A fake (meta) implementation gives torch.compile the output shapes, so a
compiled training step keeps the whole call in one graph whatever the
backend (C++, CUDA or Triton) does inside.

Why one opaque custom_op rather than ``torch.library.triton_op`` + ``wrap_triton``
for the GPU path: the op has one implementation per backend (reference, C++,
CUDA, Triton, and Triton's CPU interpreter in the tests), and only one of them
could be a triton_op. What triton_op adds, Inductor seeing the launch, buys
nothing here: Inductor does not fuse a user kernel with its neighbours, and the
kernel runs for milliseconds at the sizes that matter against microseconds of
dispatch. The Triton launch has no host sync and allocates with torch.empty.

Backward only scales the saved gradient by the incoming per-row gradient.
The reduction ("mean", "sum") is plain PyTorch on the per-row loss outside
the op, so its autograd turns into that per-row scale.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from .backends import BACKENDS
from .options import MoEKDOptions
from .reference import accumulation_dtype


@torch.library.custom_op("moekd_kernels::moe_kd_rows", mutates_args=())
def moe_kd_rows(
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
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """student (N, C), teacher (L, N, C), target (N,) → (loss, log_likelihood, agreement, grad)."""
    opts = MoEKDOptions(tuple(temperatures), tuple(expert_strengths), tuple(level_weights),
                        gate_weight, expert_weight, ignore_index)
    return BACKENDS[backend].forward(student, teacher, target, opts)


@moe_kd_rows.register_fake
def _moe_kd_rows_fake(student, teacher, target, temperatures, expert_strengths, level_weights,
                      gate_weight, expert_weight, ignore_index, backend):
    num_rows = student.shape[0]
    acc = accumulation_dtype(student.dtype)
    loss = student.new_empty((num_rows,), dtype=acc)
    log_likelihood = student.new_empty((num_rows,), dtype=acc)
    agreement = student.new_empty((num_rows,), dtype=acc)
    grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    return loss, log_likelihood, agreement, grad


def _setup_context(ctx, inputs, output):
    _, log_likelihood, agreement, grad = output
    ctx.mark_non_differentiable(log_likelihood, agreement, grad)
    ctx.set_materialize_grads(False)  # never build N×C zeros for the unused outputs
    ctx.save_for_backward(grad)


def _backward(ctx, grad_loss, _grad_ll, _grad_agreement, _grad_grad):
    if grad_loss is None:
        return (None,) * 10
    (grad,) = ctx.saved_tensors
    if torch.compiler.is_compiling():
        # AOTAutograd functionalises backward anyway (and rejects mutating a
        # buffer the graph may also return), so write the plain product.
        return (grad * grad_loss.unsqueeze(-1),) + (None,) * 9
    # Scaling in place keeps one N×C buffer alive instead of two. The version
    # counter then makes a second backward through the same graph raise
    # PyTorch's usual "modified by an inplace operation" error instead of
    # returning a twice-scaled gradient.
    return (_scale_rows_(grad, grad_loss),) + (None,) * 9


# Rows per block when a low-precision gradient is scaled on the CPU (about 1M elements).
_CPU_BLOCK_ELEMENTS = 1 << 20


def _scale_rows_(grad: Tensor, scale: Tensor) -> Tensor:
    """grad[i, :] *= scale[i], in place, with no N×C temporaries."""
    if scale.numel() == 0:
        return grad
    if grad.device.type == "cuda" and BACKENDS["triton"].unavailable_reason("cuda") is None:
        from .triton_backend import scale_rows_

        return scale_rows_(grad, scale)
    if scale.stride(0) == 0:
        # "mean"/"sum": one value broadcast to every row. A 0-dim factor keeps the
        # product in one pass, in float32 arithmetic on the CPU, for any gradient dtype.
        return grad.mul_(scale[0])
    scale = scale.unsqueeze(-1)
    if grad.device.type != "cpu" or grad.dtype == scale.dtype:
        return grad.mul_(scale)
    # A bf16/fp16 tensor times a float32 column makes CPU PyTorch upcast the whole
    # gradient through float32 copies; row blocks bound those to one block.
    rows = max(1, _CPU_BLOCK_ELEMENTS // max(grad.shape[1], 1))
    for start in range(0, grad.shape[0], rows):
        grad[start:start + rows].mul_(scale[start:start + rows])
    return grad


moe_kd_rows.register_autograd(_backward, setup_context=_setup_context)
