"""In-place row scaling of a saved gradient: the ``moekd_kernels::scale_rows_`` op.

Backward multiplies the gradient the forward pass saved by ``grad_output``, one
factor per row, in place. A registered op (with a fake implementation) so that
graph tracers that reach it see an op, not a raw kernel launch. On CUDA tensors it
runs the Triton kernel of ``triton_backend`` (imported only then); on the CPU, torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import BACKENDS


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
