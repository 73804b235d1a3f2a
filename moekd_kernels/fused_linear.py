"""Fused linear MoE-KD: hidden states and output weights in, never all N×V logits.

``fused_linear_moe_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
target)`` equals ``fused_moe_kd_loss(student_hidden @ student_weight.T + student_bias,
teacher_hidden @ teacher_weight.T + teacher_bias, target)``, value and gradients, but
only one chunk of rows of logits is alive at a time. For each chunk of non-ignored rows,
in the forward pass:

1. the two GEMMs give the chunk's student logits (n, V) and teacher logits (L, n, V);
2. the chosen backend's fused kernel gives the per-row loss, the stats and the logits'
   gradient, already scaled by the reduction's factor (``grad_scale``);
3. the gradient GEMMs write the chunk's rows of ``grad_hidden`` and add ``gradᵀ·hidden``
   to a float32 weight-gradient accumulator (and the column sums to the bias's).

Backward then only scales the three saved gradients by ``grad_output`` (and skips that
where it is 1, as ``loss.backward()`` passes). ``reduction="none"`` is the exception: a
per-row ``grad_output`` cannot be applied to a weight gradient already summed over rows,
so there backward runs the chunks again with each row's gradient scaled by its factor.

With ``process_group=`` the vocabulary is sharded (a tensor-parallel output layer): each
rank's weights are its slice of the rows, step 2 is ``vocab_parallel.SliceRows`` (the
phases, with three all-reduces of a few floats per row), and ``grad_hidden`` is summed
over the group once the chunks are done. The ranks first agree on the inputs and on the
chunk size, so that they run the same chunks and the same collectives.

Ignored rows are gathered out before the GEMMs, so they cost no GEMM work. Finding them
reads the target on the host: on a GPU that is one synchronisation per call.

The whole computation is one registered op (``moekd_kernels::fused_linear_moe_kd_loss``)
with a fake implementation, so ``torch.compile(fullgraph=True)`` keeps it in one graph.

Chunk size (``chunk_size=None``): the largest number of rows whose logits buffers fit the
memory budget ``B`` (128 MiB on CPU, 1 GiB on CUDA, ``CHUNK_BUDGET_BYTES``)::

    bytes_per_row = V · (2·b_s + L_h·b_t)
    chunk_size    = B // bytes_per_row, rounded down to a multiple of 64 when ≥ 64,
                    clamped to [1, number of non-ignored rows]

with ``b_s`` / ``b_t`` the bytes per element of the student / teacher weights (the logits'
dtype), ``L_h`` the number of teacher heads computed (1 for a head shared by L levels):
the student logits, their gradient and the teacher logits of one chunk. The peak extra
memory of a call is then about ``chunk_size · bytes_per_row`` plus the gradients it
returns (``grad_hidden`` N·H_s, ``grad_weight`` V·H_s) and a float32 V·H_s accumulator
for low-precision weights, never O(N·V). (``backend="reference"`` holds ~16 float32
chunk-sized temporaries of its own; the fused kernels none.)
"""

from __future__ import annotations

from numbers import Integral
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .backends import BACKENDS, check_backend_name, resolve_backend, resolve_sharded_backend
from .loss import MoEKDStats
from .ops import _compiling, loss_divisor, scale_rows_
from .options import (
    FLOAT_DTYPES,
    MoEKDOptions,
    PerLevel,
    check_num_items_in_batch,
    check_reduction,
    check_target_values,
    option_levels,
    resolve_options,
)
from .reference import accumulation_dtype
from .vocab_parallel import agreed_slice_rows, check_process_group, checked_on_every_rank, count_setting

# Budget for one chunk's logits buffers, by device type (see the module docstring).
CHUNK_BUDGET_BYTES = {"cpu": 128 << 20, "cuda": 1 << 30}
_DEFAULT_BUDGET = 128 << 20
_CHUNK_ALIGN = 64
_TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def auto_chunk_size(num_rows: Optional[int], vocab_size: int, student_dtype: torch.dtype,
                    teacher_dtype: torch.dtype, teacher_heads: int, device_type: str,
                    budget_bytes: Optional[int] = None) -> int:
    """Rows per chunk from the memory budget (the formula in the module docstring).

    ``num_rows=None`` leaves out the clamp to the row count, which the op applies to
    the non-ignored rows anyway (and which would make a compiled graph depend on N).
    """
    budget = CHUNK_BUDGET_BYTES.get(device_type, _DEFAULT_BUDGET) if budget_bytes is None else budget_bytes
    b_s = torch.empty((), dtype=student_dtype).element_size()
    b_t = torch.empty((), dtype=teacher_dtype).element_size()
    bytes_per_row = max(1, vocab_size * (2 * b_s + teacher_heads * b_t))
    rows = budget // bytes_per_row
    if rows >= _CHUNK_ALIGN:
        rows -= rows % _CHUNK_ALIGN
    if num_rows is not None:
        rows = min(rows, max(num_rows, 1))
    return int(max(1, rows))


# --------------------------------------------------------------------------- the chunk loop


# Rows of the weight gradient per low-precision GEMM on the CPU (see _accumulate_mm).
_ACC_BLOCK_ROWS = 8192


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (float32/64) += a @ b, with a and b in the weights' dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.device.type == "cuda":
        try:  # bf16/fp16 GEMM writing float32: no rounding of the chunk's product
            acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
            return
        except (RuntimeError, TypeError):
            pass
    # The GEMM accumulates in float32 inside; its result is rounded once per chunk
    # before the float32 sum over chunks. In row blocks, so that the low-precision
    # product is never a second V×H buffer beside the accumulator.
    for start in range(0, a.shape[0], _ACC_BLOCK_ROWS):
        acc[start:start + _ACC_BLOCK_ROWS].add_(torch.mm(a[start:start + _ACC_BLOCK_ROWS], b))


def _run_chunks(student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
                teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
                target: Tensor, opts: MoEKDOptions, rows_of, chunk_size: int,
                grad_scale: Optional[Tensor], row_scale: Optional[Tensor],
                need_rows: bool, need_hidden: bool, need_weight: bool, need_bias: bool):
    """The chunk loop shared by the forward op and the ``reduction="none"`` backward op.

    ``rows_of`` gives a chunk's per-row results from its logits, like a backend's
    ``forward``: ``LocalRows`` on one device, ``vocab_parallel.SliceRows`` when the
    vocabulary is sharded (the logits are then this rank's slice, and ``grad_hidden``
    is summed over the ranks at the end).

    student_hidden (N, H_s), student_weight (V, H_s), teacher_hidden (L_h, N, H_t),
    teacher_weight (L_h, V, H_t), teacher_bias (L_h, V) or None, target (N,) int64.
    ``grad_scale`` (0-dim) goes to the kernel; ``row_scale`` (N,) multiplies each row's
    logits gradient afterwards. Returns per-row loss/ll/agreement (N,) when ``need_rows``
    and the gradients asked for (grad_weight/grad_bias as float accumulators).
    """
    num_rows, hidden_size = student_hidden.shape
    vocab_size = student_weight.shape[0]
    heads = teacher_weight.shape[0]
    num_levels = opts.num_levels
    device = student_hidden.device
    logits_dtype = student_weight.dtype
    acc = accumulation_dtype(logits_dtype)

    rows_out = None
    if need_rows:
        rows_out = [torch.zeros(num_rows, dtype=acc, device=device) for _ in range(3)]
    grad_hidden = torch.zeros_like(student_hidden, memory_format=torch.contiguous_format) \
        if need_hidden else None
    grad_weight = torch.zeros(student_weight.shape, dtype=acc, device=device) if need_weight else None
    grad_bias = torch.zeros(vocab_size, dtype=acc, device=device) if need_bias else None
    need_grad = need_hidden or need_weight or need_bias

    valid = target != opts.ignore_index
    valid_idx = valid.nonzero().squeeze(1)   # the one host synchronisation on a GPU
    num_valid = valid_idx.numel()
    all_valid = num_valid == num_rows
    if num_valid == 0:
        return rows_out, grad_hidden, grad_weight, grad_bias

    chunk = max(1, min(chunk_size, num_valid))
    s_buf = torch.empty(chunk * vocab_size, dtype=logits_dtype, device=device)
    t_buf = torch.empty(heads * chunk * vocab_size, dtype=teacher_weight.dtype, device=device)
    weight_t = [teacher_weight[h].t() for h in range(heads)]

    for start in range(0, num_valid, chunk):
        stop = min(start + chunk, num_valid)
        n = stop - start
        if all_valid:
            rows = slice(start, stop)
            idx = None
            h_s = student_hidden[rows]
            y = target[rows]
        else:
            idx = valid_idx[start:stop]
            h_s = student_hidden.index_select(0, idx)
            y = target.index_select(0, idx)

        s_logits = s_buf[:n * vocab_size].view(n, vocab_size)
        if student_bias is None:
            torch.mm(h_s, student_weight.t(), out=s_logits)
        else:
            torch.addmm(student_bias, h_s, student_weight.t(), out=s_logits)
        t_logits = t_buf[:heads * n * vocab_size].view(heads, n, vocab_size)
        for h in range(heads):
            h_t = teacher_hidden[h, rows] if idx is None else teacher_hidden[h].index_select(0, idx)
            if teacher_bias is None:
                torch.mm(h_t, weight_t[h], out=t_logits[h])
            else:
                torch.addmm(teacher_bias[h], h_t, weight_t[h], out=t_logits[h])
        if heads != num_levels:
            # One head at several temperatures: every level reads the same logits.
            t_logits = t_logits.expand(num_levels, n, vocab_size)

        loss, log_likelihood, agreement, grad = rows_of(s_logits, t_logits, y, grad_scale, need_grad)
        if need_rows:
            for out, value in zip(rows_out, (loss, log_likelihood, agreement)):
                if idx is None:
                    out[rows] = value
                else:
                    out.index_copy_(0, idx, value.to(out.dtype))
        if not need_grad:
            continue
        if row_scale is not None:
            factor = row_scale[rows] if idx is None else row_scale.index_select(0, idx)
            grad.mul_(factor.to(grad.dtype).unsqueeze(1))
        if need_hidden:
            if idx is None:
                torch.mm(grad, student_weight, out=grad_hidden[rows])
            else:
                grad_hidden.index_copy_(0, idx, torch.mm(grad, student_weight))
        if need_weight:
            _accumulate_mm(grad_weight, grad.t(), h_s)
        if need_bias:
            grad_bias.add_(grad.sum(0, dtype=acc))
        del grad, loss, log_likelihood, agreement
    if need_hidden:
        rows_of.sum_over_ranks(grad_hidden)
    return rows_out, grad_hidden, grad_weight, grad_bias


class LocalRows:
    """``_run_chunks``' rows on one device: the backend's fused kernel on whole rows."""

    def __init__(self, backend: str, opts: MoEKDOptions) -> None:
        self.backend, self.opts = BACKENDS[backend], opts

    def __call__(self, student, teacher, target, grad_scale, need_grad):
        return self.backend.forward(student, teacher, target, self.opts, grad_scale, need_grad)

    def sum_over_ranks(self, tensor: Tensor) -> Tensor:
        return tensor


def _rows_of(backend: str, opts: MoEKDOptions, chunk_size: int, group_name: Optional[str], *,
             target: Tensor, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
             reduction: str, num_items: Optional[Tensor], need_hidden: bool) -> Tuple[object, int]:
    """The chunks' rows function and the rows per chunk: with a group, agreed on by every
    rank first (the same chunks everywhere: the fewest rows any rank asked for)."""
    if group_name is None:
        return LocalRows(backend, opts), chunk_size
    # What every rank must pass alike (vocab_parallel.agree_on_inputs).
    settings = (opts, reduction, "fused linear", count_setting(num_items), student_hidden.shape[1],
                tuple(teacher_hidden.shape[::2]), need_hidden)
    rows_of = agreed_slice_rows(group_name, backend, opts, target=target, width=student_weight.shape[0],
                                settings=settings, chunk_rows=chunk_size)
    return rows_of, rows_of.agreed.chunk_rows


def _options(temperatures, expert_strengths, level_weights, gate_weight, expert_weight,
             ignore_index) -> MoEKDOptions:
    return MoEKDOptions(tuple(temperatures), tuple(expert_strengths), tuple(level_weights),
                        gate_weight, expert_weight, ignore_index)


def _empty(like: Tensor, dtype=None) -> Tensor:
    return torch.empty(0, dtype=dtype or like.dtype, device=like.device)


# --------------------------------------------------------------------------- the registered ops


@torch.library.custom_op("moekd_kernels::fused_linear_moe_kd_loss", mutates_args=())
def fused_linear_op(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Optional[Tensor],
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Optional[Tensor],
    target: Tensor,
    num_items: Optional[Tensor],
    temperatures: List[float],
    expert_strengths: List[float],
    level_weights: List[float],
    gate_weight: float,
    expert_weight: float,
    ignore_index: int,
    backend: str,
    reduction: str,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    group_name: Optional[str] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """→ (loss, log_likelihood (N,), agreement (N,), grad_hidden, grad_weight, grad_bias).

    ``loss`` is reduced as ``reduction`` says ("mean", "sum", "none"; with ``num_items``
    the sum divided by it). The gradients are those of the returned loss; each is an
    empty tensor where not asked for, and all three are for ``reduction="none"``
    (backward recomputes them there). ``group_name``: the process group over whose ranks
    the vocabulary is sharded (this rank's weights are its slice of the rows).
    """
    opts = _options(temperatures, expert_strengths, level_weights, gate_weight, expert_weight,
                    ignore_index)
    acc = accumulation_dtype(student_weight.dtype)
    per_row = reduction == "none"
    grads_here = not per_row
    divisor = loss_divisor(target, ignore_index, reduction, num_items)
    if divisor is not None:
        divisor = divisor.to(acc)
    grad_scale = None if divisor is None else 1.0 / divisor
    rows_of, chunk_size = _rows_of(backend, opts, chunk_size, group_name, target=target,
                                   student_hidden=student_hidden, student_weight=student_weight,
                                   teacher_hidden=teacher_hidden, reduction=reduction, num_items=num_items,
                                   need_hidden=need_hidden)
    with torch.autocast(student_hidden.device.type, enabled=False):
        rows, grad_hidden, grad_weight, grad_bias = _run_chunks(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
            teacher_bias, target, opts, rows_of, chunk_size, grad_scale, None, True,
            grads_here and need_hidden, grads_here and need_weight, grads_here and need_bias)
    loss, log_likelihood, agreement = rows
    if not per_row:
        loss = loss.sum()
        if divisor is not None:
            loss = loss / divisor
    return (loss, log_likelihood, agreement,
            _empty(student_hidden) if grad_hidden is None else grad_hidden,
            _empty(student_weight) if grad_weight is None else grad_weight.to(student_weight.dtype),
            _empty(student_weight) if grad_bias is None else grad_bias.to(student_weight.dtype))


@fused_linear_op.register_fake
def _fused_linear_fake(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                       teacher_bias, target, num_items, temperatures, expert_strengths, level_weights,
                       gate_weight, expert_weight, ignore_index, backend, reduction, chunk_size,
                       need_hidden, need_weight, need_bias, group_name=None):
    num_rows = student_hidden.shape[0]
    acc = accumulation_dtype(student_weight.dtype)
    grads_here = reduction != "none"
    loss = student_hidden.new_empty((num_rows,) if reduction == "none" else (), dtype=acc)
    log_likelihood = student_hidden.new_empty((num_rows,), dtype=acc)
    agreement = student_hidden.new_empty((num_rows,), dtype=acc)
    grad_hidden = (torch.empty(student_hidden.shape, dtype=student_hidden.dtype, device=student_hidden.device)
                   if grads_here and need_hidden else _empty(student_hidden))
    grad_weight = (torch.empty(student_weight.shape, dtype=student_weight.dtype, device=student_weight.device)
                   if grads_here and need_weight else _empty(student_weight))
    grad_bias = (student_weight.new_empty((student_weight.shape[0],))
                 if grads_here and need_bias else _empty(student_weight))
    return loss, log_likelihood, agreement, grad_hidden, grad_weight, grad_bias


@torch.library.custom_op("moekd_kernels::fused_linear_moe_kd_loss_rows_backward", mutates_args=())
def fused_linear_rows_backward_op(
    grad_rows: Tensor,
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Optional[Tensor],
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Optional[Tensor],
    target: Tensor,
    temperatures: List[float],
    expert_strengths: List[float],
    level_weights: List[float],
    gate_weight: float,
    expert_weight: float,
    ignore_index: int,
    backend: str,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    group_name: Optional[str] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of ``reduction="none"``: the chunks again, row i's gradient times grad_rows[i]."""
    opts = _options(temperatures, expert_strengths, level_weights, gate_weight, expert_weight,
                    ignore_index)
    rows_of, chunk_size = _rows_of(backend, opts, chunk_size, group_name, target=target,
                                   student_hidden=student_hidden, student_weight=student_weight,
                                   teacher_hidden=teacher_hidden, reduction="none", num_items=None,
                                   need_hidden=need_hidden)
    with torch.autocast(student_hidden.device.type, enabled=False):
        _, grad_hidden, grad_weight, grad_bias = _run_chunks(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
            teacher_bias, target, opts, rows_of, chunk_size, None,
            grad_rows.to(accumulation_dtype(student_weight.dtype)), False,
            need_hidden, need_weight, need_bias)
    return (_empty(student_hidden) if grad_hidden is None else grad_hidden,
            _empty(student_weight) if grad_weight is None else grad_weight.to(student_weight.dtype),
            _empty(student_weight) if grad_bias is None else grad_bias.to(student_weight.dtype))


@fused_linear_rows_backward_op.register_fake
def _rows_backward_fake(grad_rows, student_hidden, student_weight, student_bias, teacher_hidden,
                        teacher_weight, teacher_bias, target, temperatures, expert_strengths,
                        level_weights, gate_weight, expert_weight, ignore_index, backend, chunk_size,
                        need_hidden, need_weight, need_bias, group_name=None):
    grad_hidden = (torch.empty(student_hidden.shape, dtype=student_hidden.dtype, device=student_hidden.device)
                   if need_hidden else _empty(student_hidden))
    grad_weight = (torch.empty(student_weight.shape, dtype=student_weight.dtype, device=student_weight.device)
                   if need_weight else _empty(student_weight))
    grad_bias = student_weight.new_empty((student_weight.shape[0],)) if need_bias else _empty(student_weight)
    return grad_hidden, grad_weight, grad_bias


_NUM_OP_INPUTS = 21


def _setup_context(ctx, inputs, output):
    _, log_likelihood, agreement, grad_hidden, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(log_likelihood, agreement, grad_hidden, grad_weight, grad_bias)
    ctx.set_materialize_grads(False)
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
     target, _num_items, *options) = inputs
    ctx.options = options   # temperatures ... need_bias
    ctx.per_row = options[7] == "none"
    if ctx.per_row:
        ctx.save_for_backward(student_hidden, student_weight, student_bias, teacher_hidden,
                              teacher_weight, teacher_bias, target)
    else:
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)


def _scaled(grad: Tensor, factor: Tensor) -> Tensor:
    """grad · factor (0-dim), as ops.py's backward does: in place eagerly, skipping 1."""
    if grad.numel() == 0:
        return grad
    rows = grad.view(grad.shape[0], -1)
    per_row = factor.expand(rows.shape[0])
    if _compiling():
        return (rows * per_row.unsqueeze(-1)).to(grad.dtype).view(grad.shape)
    scale_rows_(rows, per_row)
    return grad


def _backward(ctx, grad_loss, _grad_ll, _grad_agreement, _gh, _gw, _gb):
    (temperatures, expert_strengths, level_weights, gate_weight, expert_weight, ignore_index,
     backend, _reduction, chunk_size, need_hidden, need_weight, need_bias, group_name) = ctx.options
    nothing = (None,) * _NUM_OP_INPUTS
    if grad_loss is None:
        return nothing
    if torch.is_grad_enabled() and not _compiling():
        # The saved gradients are constants: a graph through them would silently
        # drop the loss's second-order term.
        raise RuntimeError(
            "fused_linear_moe_kd_loss does not support double backward (create_graph=True): "
            "its gradient is computed in the forward pass and has no graph of its own")
    if ctx.per_row:
        (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
         target) = ctx.saved_tensors
        grad_hidden, grad_weight, grad_bias = fused_linear_rows_backward_op(
            grad_loss, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
            teacher_bias, target, temperatures, expert_strengths, level_weights, gate_weight,
            expert_weight, ignore_index, backend, chunk_size, need_hidden, need_weight, need_bias,
            group_name)
    else:
        grad_hidden, grad_weight, grad_bias = (_scaled(g, grad_loss) for g in ctx.saved_tensors)
    return ((grad_hidden if need_hidden else None),
            (grad_weight if need_weight else None),
            (grad_bias if need_bias else None)) + nothing[3:]


fused_linear_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- argument checks


def _check_tensor(name: str, value, *, floating: bool = True) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), "
                        f"got dtype {value.dtype}")
    return value


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(value: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """What autocast does to a linear layer's operands: floating, non-float64 ones to ``dtype``."""
    if value is None or dtype is None or value.dtype in (torch.float64, dtype):
        return value
    return value.to(dtype)


class _Prepared(NamedTuple):
    """``fused_linear_moe_kd_loss``'s inputs as the op takes them, checked."""

    student_hidden: Tensor             # (N, H_s), cast as autocast says
    student_weight: Tensor             # (V, H_s)
    student_bias: Optional[Tensor]     # (V,)
    teacher_hidden: Tensor             # (L_h, N, H_t), detached
    teacher_weight: Tensor             # (L_h, V, H_t), detached
    teacher_bias: Optional[Tensor]     # (L_h, V), detached
    target: Tensor                     # (N,) int64
    opts: MoEKDOptions
    num_items: Optional[Tensor]
    backend: str
    chunk_size: int


def _prepare(student_hidden, student_weight, teacher_hidden, teacher_weight, target, *, student_bias,
             teacher_bias, chunk_size, temperature, expert_strength, level_weights, gate_weight,
             expert_weight, ignore_index, reduction, num_items_in_batch, backend, return_stats,
             sharded: bool) -> _Prepared:
    """Every check of ``fused_linear_moe_kd_loss``'s arguments; ``sharded``: the weights are
    one rank's slice of the vocabulary."""
    _check_tensor("student_hidden", student_hidden)
    _check_tensor("student_weight", student_weight)
    _check_tensor("teacher_hidden", teacher_hidden)
    _check_tensor("teacher_weight", teacher_weight)
    _check_tensor("target", target, floating=False)
    if student_bias is not None:
        _check_tensor("student_bias", student_bias)
    if teacher_bias is not None:
        _check_tensor("teacher_bias", teacher_bias)
    if target.dtype not in _TARGET_DTYPES:
        raise TypeError(f"target must be an integer tensor of class indices, got dtype {target.dtype}")
    device = student_hidden.device
    for name, t in (("student_weight", student_weight), ("teacher_hidden", teacher_hidden),
                    ("teacher_weight", teacher_weight), ("target", target),
                    ("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} must be on student_hidden's device {device}, got {t.device}")

    if student_hidden.dim() < 1:
        raise ValueError("student_hidden must have shape (..., H_s), got a scalar")
    if student_weight.dim() != 2:
        raise ValueError(f"student_weight must have shape (V, H_s), got {tuple(student_weight.shape)}")
    vocab_size, hidden_size = student_weight.shape
    if student_hidden.shape[-1] != hidden_size:
        raise ValueError(
            f"student_hidden must have shape (..., {hidden_size}) to match student_weight "
            f"{tuple(student_weight.shape)}, got {tuple(student_hidden.shape)}")
    if vocab_size < 1:
        raise ValueError("student_weight must have at least one row (V >= 1), got V=0")
    lead = tuple(student_hidden.shape[:-1])
    if tuple(target.shape) != lead:
        raise ValueError(f"target must have shape {lead} (student_hidden without its last dimension), "
                         f"got {tuple(target.shape)}")
    if student_bias is not None and tuple(student_bias.shape) != (vocab_size,):
        raise ValueError(f"student_bias must have shape ({vocab_size},), got {tuple(student_bias.shape)}")

    if teacher_weight.dim() == 2:
        heads = 1
        weight_3d = teacher_weight.unsqueeze(0)
        expected_hidden = lead + (teacher_weight.shape[1],)
        if tuple(teacher_hidden.shape) != expected_hidden:
            raise ValueError(f"teacher_hidden must have shape {expected_hidden} for a teacher_weight of "
                             f"shape {tuple(teacher_weight.shape)}, got {tuple(teacher_hidden.shape)}")
        hidden_3d = teacher_hidden.reshape(1, -1, teacher_weight.shape[1])
    elif teacher_weight.dim() == 3:
        heads = teacher_weight.shape[0]
        weight_3d = teacher_weight
        expected_hidden = (heads,) + lead + (teacher_weight.shape[2],)
        if heads < 1 or tuple(teacher_hidden.shape) != expected_hidden:
            raise ValueError(f"teacher_hidden must have shape {expected_hidden} (L, ..., H_t) for a "
                             f"teacher_weight of shape {tuple(teacher_weight.shape)}, got "
                             f"{tuple(teacher_hidden.shape)}")
        hidden_3d = teacher_hidden.reshape(heads, -1, teacher_weight.shape[2])
    else:
        raise ValueError(f"teacher_weight must have shape (V, H_t) or (L, V, H_t), got "
                         f"{tuple(teacher_weight.shape)}")
    if weight_3d.shape[1] != vocab_size:
        raise ValueError(f"teacher_weight must have V={vocab_size} rows like student_weight, got "
                         f"{tuple(teacher_weight.shape)}")
    bias_2d = None
    if teacher_bias is not None:
        if tuple(teacher_bias.shape) == (vocab_size,):
            bias_2d = teacher_bias.unsqueeze(0).expand(heads, vocab_size)
        elif tuple(teacher_bias.shape) == (heads, vocab_size) and teacher_weight.dim() == 3:
            bias_2d = teacher_bias
        else:
            expected = f"({vocab_size},)" + (f" or ({heads}, {vocab_size})" if teacher_weight.dim() == 3 else "")
            raise ValueError(f"teacher_bias must have shape {expected}, got {tuple(teacher_bias.shape)}")

    num_levels = heads if teacher_weight.dim() == 3 else (
        option_levels(temperature, expert_strength, level_weights) or 1)
    opts = resolve_options(num_levels, temperature=temperature, expert_strength=expert_strength,
                           level_weights=level_weights, gate_weight=gate_weight,
                           expert_weight=expert_weight, ignore_index=ignore_index)
    check_reduction(reduction)
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {return_stats!r}")
    _check_chunk_size(chunk_size)
    num_items = check_num_items_in_batch(num_items_in_batch, reduction, device)

    # Autocast: the GEMMs in its dtype, as F.linear under autocast; the casts are
    # differentiable, so gradients come back in the caller's dtypes.
    cast_to = _autocast_dtype(device.type)
    s_hidden = _cast(student_hidden.reshape(-1, hidden_size), cast_to)
    s_weight = _cast(student_weight, cast_to)
    s_bias = _cast(student_bias, cast_to)
    t_hidden = _cast(hidden_3d.detach(), cast_to)
    t_weight = _cast(weight_3d.detach(), cast_to)
    t_bias = _cast(None if bias_2d is None else bias_2d.detach(), cast_to)
    if s_hidden.dtype != s_weight.dtype:
        raise TypeError(f"student_hidden and student_weight must have one dtype, got "
                        f"{student_hidden.dtype} and {student_weight.dtype}")
    if s_bias is not None and s_bias.dtype != s_weight.dtype:
        raise TypeError(f"student_bias must have student_weight's dtype {student_weight.dtype}, "
                        f"got {student_bias.dtype}")
    if t_hidden.dtype != t_weight.dtype:
        raise TypeError(f"teacher_hidden and teacher_weight must have one dtype, got "
                        f"{teacher_hidden.dtype} and {teacher_weight.dtype}")
    if t_bias is not None and t_bias.dtype != t_weight.dtype:
        raise TypeError(f"teacher_bias must have teacher_weight's dtype {teacher_weight.dtype}, "
                        f"got {teacher_bias.dtype}")

    target_1d = target.reshape(-1).to(torch.int64)
    if sharded:  # the target's range is checked against the global V by the op
        chosen = resolve_sharded_backend(backend, device, s_weight.dtype, opts.num_levels)
    else:
        check_target_values(target_1d, vocab_size, opts.ignore_index)
        chosen = resolve_backend(backend, device, s_weight.dtype, opts.num_levels)
    if chunk_size is None:
        chunk_size = auto_chunk_size(None, vocab_size, s_weight.dtype, t_weight.dtype, heads, device.type)
    return _Prepared(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, target_1d, opts, num_items,
                     chosen, int(chunk_size))



def fused_linear_moe_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    target: Tensor,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    temperature: PerLevel = 4.0,
    expert_strength: PerLevel = 2.0,
    level_weights: Optional[Sequence[float]] = None,
    gate_weight: float = 1.0,
    expert_weight: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: Union[int, Tensor, None] = None,
    backend: str = "auto",
    return_stats: bool = False,
    process_group=None,
) -> Union[Tensor, Tuple[Tensor, MoEKDStats]]:
    """MoE-KD on ``hidden @ weight.T + bias`` without materialising the N×V logits.

    Equal, value and gradients with respect to ``student_hidden``, ``student_weight`` and
    ``student_bias``, to ``fused_moe_kd_loss`` on the materialised logits; the teacher
    gets no gradient.

    Args:
        student_hidden: ``(..., H_s)``, e.g. the student's last hidden states.
        student_weight: ``(V, H_s)``, e.g. ``student.lm_head.weight``; same dtype as the hidden states.
        teacher_hidden: ``(..., H_t)``, or ``(L, ..., H_t)`` for L teacher heads.
        teacher_weight: ``(V, H_t)``, or ``(L, V, H_t)`` for L heads. One head with per-level
            option lists of length L is L levels of the same logits (computed once per chunk).
        target: ``(...)`` class indices in ``[0, V)`` or ``ignore_index``.
        student_bias: ``(V,)`` or None.
        teacher_bias: ``(V,)``, ``(L, V)`` for L heads, or None.
        chunk_size: rows per chunk; None picks it from a memory budget (module docstring).
        num_items_in_batch: int or 0-dim tensor, with ``reduction="mean"``: the loss is then
            the sum over non-ignored rows divided by it (Hugging Face / TRL gradient accumulation).
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded
            (tensor parallelism): each rank passes its contiguous slice of the output rows,
            ``student_weight`` (V_r, H_s) and ``teacher_weight`` (..., V_r, H_t) (and biases),
            slices in rank order, with ``student_hidden``, ``teacher_hidden`` and ``target``
            (global class indices) the same on every rank. Every rank gets the unsharded loss
            and stats, the gradient of its own weight slice, and ``student_hidden``'s whole
            gradient (summed over the group).
        The other options are those of :func:`moekd_kernels.fused_moe_kd_loss`.

    Under autocast the GEMMs run in the autocast dtype, as ``F.linear`` would.
    """
    args = (student_hidden, student_weight, teacher_hidden, teacher_weight, target)
    options = dict(student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=chunk_size,
                   temperature=temperature, expert_strength=expert_strength, level_weights=level_weights,
                   gate_weight=gate_weight, expert_weight=expert_weight, ignore_index=ignore_index,
                   reduction=reduction, num_items_in_batch=num_items_in_batch, backend=backend,
                   return_stats=return_stats)
    if process_group is None:
        p = _prepare(*args, **options, sharded=False)
    else:
        p = checked_on_every_rank(process_group, _prepare, *args, **options, sharded=True)
    opts = p.opts
    grad_on = torch.is_grad_enabled()
    need_hidden = grad_on and p.student_hidden.requires_grad
    need_weight = grad_on and p.student_weight.requires_grad
    need_bias = grad_on and p.student_bias is not None and p.student_bias.requires_grad
    loss, log_likelihood, agreement, _, _, _ = fused_linear_op(
        p.student_hidden, p.student_weight, p.student_bias, p.teacher_hidden, p.teacher_weight,
        p.teacher_bias, p.target, p.num_items, list(opts.temperatures), list(opts.expert_strengths),
        list(opts.level_weights), opts.gate_weight, opts.expert_weight, opts.ignore_index, p.backend,
        reduction, p.chunk_size, need_hidden, need_weight, need_bias,
        None if process_group is None else process_group.group_name)
    if reduction == "none":
        loss = loss.reshape(target.shape)
    if not return_stats:
        return loss
    return loss, MoEKDStats(log_likelihood.reshape(target.shape), agreement.reshape(target.shape))


class FusedLinearMoEKDLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_linear_moe_kd_loss`, with the same options and defaults
    (``num_items_in_batch`` goes to ``forward``, as in ``MoEKDLoss``)."""

    def __init__(
        self,
        *,
        chunk_size: Optional[int] = None,
        temperature: PerLevel = 4.0,
        expert_strength: PerLevel = 2.0,
        level_weights: Optional[Sequence[float]] = None,
        gate_weight: float = 1.0,
        expert_weight: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: str = "auto",
        return_stats: bool = False,
        process_group=None,
    ) -> None:
        super().__init__()
        # Fail at construction for what can be checked without the tensors.
        check_reduction(reduction)
        check_backend_name(backend)
        if process_group is not None:
            check_process_group(process_group)
        resolve_options(option_levels(temperature, expert_strength, level_weights) or 1,
                        temperature=temperature, expert_strength=expert_strength,
                        level_weights=level_weights, gate_weight=gate_weight,
                        expert_weight=expert_weight, ignore_index=ignore_index)
        _check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self.temperature = temperature
        self.expert_strength = expert_strength
        self.level_weights = level_weights
        self.gate_weight = gate_weight
        self.expert_weight = expert_weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend
        self.return_stats = return_stats
        self.process_group = process_group

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                teacher_weight: Tensor, target: Tensor, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None, *,
                num_items_in_batch: Union[int, Tensor, None] = None):
        """``num_items_in_batch`` is per call (it changes every batch), as in ``MoEKDLoss``."""
        return fused_linear_moe_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, target,
            student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=self.chunk_size,
            temperature=self.temperature, expert_strength=self.expert_strength,
            level_weights=self.level_weights, gate_weight=self.gate_weight,
            expert_weight=self.expert_weight, ignore_index=self.ignore_index,
            reduction=self.reduction, num_items_in_batch=num_items_in_batch,
            backend=self.backend, return_stats=self.return_stats, process_group=self.process_group)

    def extra_repr(self) -> str:
        return (f"chunk_size={self.chunk_size}, temperature={self.temperature}, "
                f"expert_strength={self.expert_strength}, level_weights={self.level_weights}, "
                f"gate_weight={self.gate_weight}, expert_weight={self.expert_weight}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"backend={self.backend}")
