"""Multi-task binary cross-entropy as one autograd node with an analytic gradient.

Autograd through the element-wise formula would keep several ``[B, T]`` intermediates alive and
replay one backward kernel per forward op. Here the forward writes into a few fresh buffers in
place and keeps nothing but its inputs; the backward rebuilds ``sigmoid(x)`` and forms the
gradient in place. That is what brings the loss within 2x of a single unweighted
``binary_cross_entropy_with_logits`` call (see ``docs/performance.md``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

Scale = Union[float, torch.Tensor, None]


def _log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    # softplus with beta = -1 is log(sigmoid(x)) computed stably, in one kernel with one output;
    # F.logsigmoid also writes a second [B, T] buffer for its own backward, which we do not use.
    # Past the threshold softplus returns x itself, where log(sigmoid(x)) = x - log1p(exp(x)) = x
    # to within exp(-50).
    return F.softplus(x, beta=-1.0, threshold=50.0)


def _log_sigmoids(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log sigmoid(x), log sigmoid(-x))`` from one softplus, in fresh buffers.

    Both are ``min(+-x, 0) - log1p(exp(-|x|))``: the softplus of ``-|x|`` is shared, and the rest
    are passes about ten times cheaper than a softplus on the CPU. Exact at infinite logits
    (``log sigmoid(inf) = 0``, ``log sigmoid(-inf) = -inf``) and NaN for NaN, as two log-sigmoids.
    Under ``torch.compile`` (which fuses either form) the two log-sigmoids.
    """
    if torch.compiler.is_compiling():
        return _log_sigmoid(x), _log_sigmoid(-x)
    common = F.softplus(x.abs().neg_())
    return torch.clamp_max(x, 0.0).sub_(common), torch.clamp_min(x, 0.0).neg_().sub_(common)


def column_sums(block: torch.Tensor) -> torch.Tensor:
    """Sum a contiguous ``[B, T]`` block over its rows.

    On the CPU a reduction over the outer dimension of a tall, narrow block is slow; summing
    groups of rows first (a ``[B / 256, 256, T]`` view) is several times faster and, being a
    two-level sum, no less accurate. Under ``torch.compile`` it is a plain ``sum(0)``.
    """
    rows, columns = block.shape
    # Under torch.compile the compiler writes its own reduction, and branching on the row count
    # would build one graph per branch of a dynamic batch size; under torch.jit.trace the row
    # count is a tensor, and a branch on it would be frozen into the trace.
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or rows < _TWO_LEVEL_ROWS:  # type: ignore[attr-defined,no-untyped-call]
        return block.sum(0)
    head = rows - rows % _ROW_GROUP
    sums = block[:head].view(-1, _ROW_GROUP, columns).sum(1).sum(0)
    if head < rows:
        sums = sums + block[head:].sum(0)
    return sums


_ROW_GROUP = 256
_TWO_LEVEL_ROWS = 8192


#: The integer type of a float's bits: a mask of all-ones or all-zeros words of this type selects
#: floats with one bitwise and.
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


def keep_bits(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``mask`` as words of ``dtype``'s width: all bits set where true, none where false (``None``: no mask).

    Negated as bytes (-1 is all bits set), then widened, which extends the sign: a pass over one
    byte per entry instead of four. On the CPU, converting a bool tensor is several times slower
    than converting its bytes. ``None`` also under ``torch.compile`` (which fuses a select into its own
    loops) and for a dtype without an integer twin, where the callers fill instead.
    """
    if mask is None or dtype not in _BITS or torch.compiler.is_compiling():
        return None
    return mask.view(torch.int8).neg().to(_BITS[dtype])


#: Blocks of at most a sixteenth this many columns are computed as ``[B / R, R * T]`` tiles of
#: ``R`` rows, at least this many columns wide (measured: no gain by T = 64, a loss at B = 4096).
_TILE_WIDTH = 256
#: ... when they hold at least this many entries (a few more small ops per call have to pay off):
#: the gain per entry is large for the narrowest blocks (8x at T = 4) and small by T = 16 (1.3x).
_TILE_ENTRIES = 1 << 18
_NARROW_TILE_ENTRIES, _NARROW = 1 << 15, 8


def _rows_per_tile(
    x: torch.Tensor, y: torch.Tensor, weights: Optional[torch.Tensor], mask: Optional[torch.Tensor]
) -> int:
    """How many rows of a narrow ``[B, T]`` block to lay side by side (1: none).

    An element-wise op with a per-task ``[T]`` operand runs one short inner loop per row: at
    ``T = 4`` it costs eight times its cost on a ``[B / 64, 256]`` view of the same memory, where
    the operand is the ``[T]`` vector repeated 64 times. Only for contiguous ``[B, T]`` inputs
    (``[B]`` weights broadcast per row, which a tile cannot), a row count ``B`` that the tile
    height divides, and not under ``torch.compile``, which writes its own loops, nor ``torch.jit.trace``.
    """
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:  # traced sizes are tensors
        return 1
    batch, tasks = x.shape
    least = _NARROW_TILE_ENTRIES if tasks <= _NARROW else _TILE_ENTRIES
    if batch * tasks < least or tasks * 16 > _TILE_WIDTH:
        return 1
    rows = 2
    while rows * tasks < _TILE_WIDTH:
        rows *= 2
    if batch % rows:
        return 1
    for tensor in (x, y, weights, mask):
        if tensor is not None and (tensor.shape != x.shape or not tensor.is_contiguous()):
            return 1
    return rows


def _tiled(vector: torch.Tensor, rows: int) -> torch.Tensor:
    """A ``[T]`` vector repeated ``rows`` times, for a tile of ``rows`` rows (cheaper than ``repeat``)."""
    return vector.expand(rows, vector.shape[0]).reshape(-1)


def _weigh_and_mask_(
    block: torch.Tensor, weights: Optional[torch.Tensor], mask: Optional[torch.Tensor], keep: Optional[torch.Tensor]
) -> torch.Tensor:
    """``block`` times ``weights``, +0 where ``mask`` is false; in place (``block`` is a fresh buffer).

    Zeroed, not multiplied by the mask: an unlabelled entry may hold a NaN label or logit, and NaN * 0
    is NaN. With ``keep`` (:func:`keep_bits` of the mask) through the bits, one pass about as cheap
    as a multiply; a ``masked_fill_`` costs about ten times more on the CPU.
    """
    if weights is not None:
        block.mul_(weights)
    if keep is not None:
        block.view(keep.dtype).bitwise_and_(keep)
    elif mask is not None:
        block.masked_fill_(mask.logical_not(), 0.0)
    return block


def _losses_into(
    x: torch.Tensor,
    y: torch.Tensor,
    constants: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    weighted: torch.Tensor,
    losses: torch.Tensor,
    grad: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The element losses, unweighted, into ``losses``; with ``grad``, their gradient into it. ``weighted`` is spent.

    ``constants`` is ``(p, 1, p - 1)`` (:func:`_constants`). The gradient, ``(1 + (p - 1) y)
    sigmoid(x) - p y`` (torch's own form), reuses the losses' first pass.
    """
    # l = (1 - y) x - (1 + (p - 1) y) log sigmoid(x), in torch's order of operations, so that
    # infinite and huge logits give torch's values: (1 - y) x is a product, never x - y x (at
    # x = +inf, y = 0 that is inf - 0 * inf = NaN where torch gives inf), and the weight
    # multiplies log sigmoid(x) whole, each product rounded on its own (splitting the weight,
    # or a fused multiply-add, leaves 1e22 where torch's terms cancel to 0 at x = -1e30).
    # `weighted` holds 1 + (p - 1) y, then that times log sigmoid(x); `losses` holds log sigmoid(x),
    # then (1 - y) x, then the loss.
    pos_weight, ones, pos_weight_less_one = constants
    torch.addcmul(ones, y, pos_weight_less_one, out=weighted)
    if grad is not None:
        torch.sigmoid(x, out=grad).mul_(weighted).addcmul_(y, pos_weight, value=-1.0)
    torch._C._nn.softplus(x, -1.0, 50.0, out=losses)  # type: ignore[call-arg]  # _log_sigmoid, into the buffer
    weighted.mul_(losses)
    return torch.sub(ones, y, out=losses).mul_(x).sub_(weighted)


def _constants(pos_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(p, 1, p - 1)``: the per-task vectors of :func:`_losses_into`, made once per call."""
    ones = torch.ones_like(pos_weight)
    return pos_weight, ones, pos_weight - ones


def _element_losses(
    x: torch.Tensor,
    y: torch.Tensor,
    pos_weight: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
) -> torch.Tensor:
    # Two fresh [B, T] buffers, written in place by _losses_into (one is left).
    if torch.compiler.is_compiling():
        # The compiler fuses the expression into its kernels, so the count of passes does not
        # matter, and it rounds its own way anyway. The softplus form, (1 - y) softplus(x) -
        # p y log sigmoid(x), keeps (1 - y) a factor (inf-safe, see _losses_into) and lets the compiler
        # reuse log sigmoid(x) in the gradient's loop, which makes it as fast as before the
        # infinite-logit fix; tests check it against torch at infinite and huge logits too.
        log_sigmoid = _log_sigmoid(x)
        losses = (1.0 - y) * (x - log_sigmoid) - pos_weight * y * log_sigmoid
    else:
        losses = _losses_into(x, y, _constants(pos_weight), torch.empty_like(x), torch.empty_like(x))
    return _weigh_and_mask_(losses, weights, mask, keep)


def _element_gradients(
    x: torch.Tensor,
    y: torch.Tensor,
    pos_weight: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
    task_scale: torch.Tensor,
) -> torch.Tensor:
    # dl/dx = (1 + (p - 1) y) s - p y = s - y (p + (1 - p) s) with s = sigmoid(x); the bracket is
    # lerp(p, 1, s). Times the weight and the upstream per-task factor, built in one buffer. Under
    # create_graph (double backward) the same steps run out of place, so autograd can follow them.
    in_place = not torch.is_grad_enabled()
    grad = torch.sigmoid(x)
    bracket = torch.lerp(pos_weight, torch.ones_like(pos_weight), grad)
    if in_place:
        return _weigh_and_mask_(grad.addcmul_(y, bracket, value=-1).mul_(task_scale), weights, mask, keep)
    grad = (grad - y * bracket) * task_scale
    if weights is not None:
        grad = grad * weights
    return grad if mask is None else torch.where(mask, grad, 0.0)


#: Both kernels run over blocks of rows of about this many entries, with working buffers of the
#: block's shape allocated once per call: they stay in the cache, and the step allocates one fresh
#: ``[B, T]`` buffer (the gradient) instead of one per pass. On the CPU a fresh ``[B, T]`` buffer can
#: cost more than a multiply over it: its pages are mapped on first touch, and glibc's allocator
#: hands large blocks back between calls. Measured on the focal kernel at B = 65536, T = 14: 2^16 to
#: 2^18 alike, 1.2x to 1.5x faster than whole-block buffers; smaller blocks pay Python's cost per
#: op, larger ones lose the cache.
_BLOCK_ENTRIES = 1 << 17
#: The plain kernel runs in blocks from this many entries. It makes few passes, so for smaller
#: blocks the Python cost of the blocks (and of forming the gradient in the forward) outweighs the
#: buffers saved: at B = 512 it measured up to 1.5x slower. With a mask, against the whole-block
#: kernel: at 2^22 entries (65536 x 64) faster in every measurement (1.7x to 2.7x in CPU time on one
#: thread, 1.2x to 1.7x in wall time on two); at 2^18 and 2^20 entries faster on one thread but, on
#: two, as fast or slower depending on how warm glibc keeps its heap (the whole-block kernel is
#: slowed by page faults only when glibc has handed its buffers back).
_BLOCKED_ENTRIES = 1 << 21

Blocks = Iterator[tuple[torch.Tensor, torch.Tensor, list[Optional[torch.Tensor]], list[torch.Tensor]]]


def _row_blocks(x: torch.Tensor, y: torch.Tensor, operands: Sequence[Optional[torch.Tensor]], buffers: int) -> Blocks:
    """``(x, y, operands, scratch)`` block by block of rows (:data:`_BLOCK_ENTRIES`); ``None`` operands stay ``None``.

    The operands have ``x``'s rows (``[B, T]`` or ``[B, 1]``); ``scratch`` holds ``buffers`` buffers
    of the block's shape, from one allocation. Each operand is split once, which is cheaper than
    slicing it per block.
    """
    rows, width = x.shape
    height = max(1, min(rows, _BLOCK_ENTRIES // max(width, 1)))
    scratch = list(x.new_empty(buffers, height, width).unbind(0))
    parts = [None if tensor is None else torch.split(tensor, height) for tensor in operands]
    for index, (x_block, y_block) in enumerate(zip(torch.split(x, height), torch.split(y, height), strict=True)):
        size = x_block.shape[0]
        others = [None if split is None else split[index] for split in parts]
        yield x_block, y_block, others, (scratch if size == height else [buffer[:size] for buffer in scratch])


def _keep_bits_into(mask: Optional[torch.Tensor], buffer: torch.Tensor) -> Optional[torch.Tensor]:
    """:func:`keep_bits` of ``mask`` written over ``buffer`` (a spent working buffer of the mask's shape)."""
    if mask is None or buffer.dtype not in _BITS:
        return None
    return torch.mul(mask.view(torch.int8), -1, out=buffer.view(_BITS[buffer.dtype]))


def _plain_block(
    x: torch.Tensor,
    y: torch.Tensor,
    constants: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    grad: Optional[torch.Tensor],
    buffers: list[torch.Tensor],
) -> torch.Tensor:
    """Column sums of a block's element losses (:func:`_losses_into`), and their gradient into ``grad``.

    Losses and gradient are weighed and masked alike, so the backward only scales the gradient per
    task. The mask's bits are written over the first buffer once it is spent.
    """
    weighted, losses = buffers
    _losses_into(x, y, constants, weighted, losses, grad)
    keep = _keep_bits_into(mask, weighted)
    sums = column_sums(_weigh_and_mask_(losses, weights, mask, keep))
    if grad is not None:
        _weigh_and_mask_(grad, weights, mask, keep)
    return sums


def _plain_sums(
    x: torch.Tensor,
    y: torch.Tensor,
    pos_weight: torch.Tensor,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    grad: Optional[torch.Tensor],
) -> torch.Tensor:
    """Column sums of the element losses block by block, and their gradient into ``grad`` (``[B, T]``, when given)."""
    constants, sums = _constants(pos_weight), None
    for x_block, y_block, (weights_block, mask_block, grad_block), scratch in _row_blocks(
        x, y, (weights, mask, grad), 2
    ):
        part = _plain_block(x_block, y_block, constants, weights_block, mask_block, grad_block, scratch)
        sums = part if sums is None else sums.add_(part)
    return x.new_zeros(x.shape[1]) if sums is None else sums


class Focal(NamedTuple):
    r"""The focal kernel's per-task constants, ``[T]`` vectors in the compute dtype.

    The element loss is written with signed target weights affine in the label ``y`` as given,

    .. math::
        l = P\, q^\gamma \log s + N\, s^\gamma \log q, \qquad
        P = -\alpha_1 p\, y', \quad N = -\alpha_0 (1 - y'), \quad y' = y (1 - \varepsilon) + \varepsilon / 2,

    with :math:`s = \sigma(x)`, :math:`q = \sigma(-x)`: ``P = pos_offset + pos_slope * y`` and
    ``N = neg_offset + neg_slope * y``, one pass each, label smoothing and the sign folded into the
    constants. ``power`` ``k`` in {1, 2, 3} says that every ``gamma`` is 0 or ``k``; the modulations
    are then products, ``max(s, floor) ** k`` with ``floor`` 1 where ``gamma`` is 0 and 0 where it is
    ``k``. ``power`` 0 (``floor`` ``None``): exponentials, ``exp(gamma log s)``, for any ``gamma``.
    """

    gamma: torch.Tensor
    pos_offset: torch.Tensor
    pos_slope: torch.Tensor
    neg_offset: torch.Tensor
    neg_slope: torch.Tensor
    power: int = 0
    floor: Optional[torch.Tensor] = None

    def tiled(self, rows: int) -> Focal:
        """The constants repeated for a tile of ``rows`` rows (see :func:`_rows_per_tile`)."""
        gamma, pos_offset, pos_slope, neg_offset, neg_slope = (_tiled(vector, rows) for vector in self[:5])
        floor = None if self.floor is None else _tiled(self.floor, rows)
        return Focal(gamma, pos_offset, pos_slope, neg_offset, neg_slope, self.power, floor)


def _modulation(p: torch.Tensor, log_p: torch.Tensor, focal: Focal, out: torch.Tensor) -> torch.Tensor:
    """``p ** gamma`` into ``out``, for ``p`` a sigmoid and ``log_p`` its log.

    With an integer ``power`` ``k``, ``max(p, floor) ** k``: exactly ``p ** k`` or 1 (``p <= 1``),
    torch's ``pow`` multiplying for these exponents, which is more exact than an exp and costs a
    multiply where an exp costs some eight. Otherwise ``exp(gamma log p)``, exactly 1 for
    ``gamma = 0`` at every finite logit.
    """
    if focal.floor is None:
        return torch.mul(focal.gamma, log_p, out=out).exp_()
    modulation = torch.maximum(p, focal.floor, out=out)
    return modulation if focal.power == 1 else modulation.pow_(focal.power)


def _focal_block(
    x: torch.Tensor,
    y: torch.Tensor,
    focal: Focal,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
    grad: Optional[torch.Tensor],
    buffers: list[torch.Tensor],
) -> torch.Tensor:
    r"""Column sums of a block's focal element losses, and their gradient into ``grad`` (when given).

    The gradient shares the loss's passes: ``log s``, ``log q`` (from one softplus) and the
    modulated target weights ``A = P q^g``, ``B = N s^g`` (see :class:`Focal`), from which

    .. math:: \frac{\partial l}{\partial x} = A (q - g s \log s) - B (s - g q \log q);

    with ``g = 0`` it is ``P q - N s = a_0 (1 - y') s - a_1 p y' q``, the BCE gradient. ``log q`` is
    a log-sigmoid of its own, not ``log(1 - s)``, which would lose every digit where ``s`` rounds
    to 1, and ``q`` is ``sigmoid(-x)``, not ``1 - s``, for the same reason. Losses and gradient
    are weighed and masked; every op writes into ``buffers`` (six, the block's shape) or ``grad``.
    """
    common, log_s, log_q, positive, negative, losses = buffers
    # -log(1 + exp(-|x|)): softplus with beta = -1 of |x|, whose product with beta is never past
    # the threshold. log sigmoid(x) = min(x, 0) + common and log sigmoid(-x) = common - max(x, 0).
    torch._C._nn.softplus(torch.abs(x, out=common), -1.0, 20.0, out=common)  # type: ignore[call-arg]  # not in the stubs
    torch.clamp_max(x, 0.0, out=log_s).add_(common)
    torch.sub(common, torch.clamp_min(x, 0.0, out=log_q), out=log_q)
    s, q = log_s, log_q  # the sigmoids only for what uses them: the gradient, or integer powers
    if grad is not None or focal.floor is not None:
        s, q = torch.sigmoid(x, out=common), torch.neg(x, out=losses if grad is None else grad).sigmoid_()
    _modulation(q, log_q, focal, positive).mul_(torch.addcmul(focal.pos_offset, y, focal.pos_slope, out=losses))
    _modulation(s, log_s, focal, negative).mul_(torch.addcmul(focal.neg_offset, y, focal.neg_slope, out=losses))
    # u = A log s and v = B log q, in place of the logs; l = u + v.
    torch.add(log_s.mul_(positive), log_q.mul_(negative), out=losses)
    sums = column_sums(_weigh_and_mask_(losses, weights, mask, keep))
    if grad is not None:
        # A (q - g s log s) - B (s - g q log q) = (A q - B s) - g (s u - q v)
        positive.mul_(q).addcmul_(negative, s, value=-1.0)
        log_s.mul_(s).addcmul_(log_q, q, value=-1.0)
        _weigh_and_mask_(torch.addcmul(positive, log_s, focal.gamma, value=-1.0, out=grad), weights, mask, keep)
    return sums


def _focal_sums(
    x: torch.Tensor,
    y: torch.Tensor,
    focal: Focal,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
    with_gradient: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Column sums of the focal element losses, and (``with_gradient``) their gradient ``[B, T]``.

    Block by block of rows (:data:`_BLOCK_ENTRIES`) through :func:`_focal_block`. Under
    ``torch.compile`` the losses as one expression, which the compiler fuses, and no gradient.
    """
    if torch.compiler.is_compiling():
        log_s, log_q = _log_sigmoids(x)
        positive = torch.exp(focal.gamma * log_q) * (focal.pos_offset + focal.pos_slope * y)
        negative = torch.exp(focal.gamma * log_s) * (focal.neg_offset + focal.neg_slope * y)
        return column_sums(_weigh_and_mask_(positive * log_s + negative * log_q, weights, mask, keep)), None
    grad = torch.empty_like(x) if with_gradient else None
    sums: Optional[torch.Tensor] = None
    for x_block, y_block, (weights_block, mask_block, keep_block, grad_block), scratch in _row_blocks(
        x, y, (weights, mask, keep, grad), 6
    ):
        part = _focal_block(x_block, y_block, focal, weights_block, mask_block, keep_block, grad_block, scratch)
        sums = part if sums is None else sums.add_(part)
    return (x.new_zeros(x.shape[1]) if sums is None else sums), grad


def _focal_element_gradients(
    x: torch.Tensor,
    y: torch.Tensor,
    focal: Focal,
    weights: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
    task_scale: torch.Tensor,
    saved: Optional[torch.Tensor],
) -> torch.Tensor:
    """The focal gradient times ``task_scale``: ``saved`` (the forward's) scaled in place, else formed anew.

    Under create_graph (double backward) and torch.compile the math of :func:`_focal_block` runs
    out of place, with exponential modulations, for autograd (or the compiler) to follow; ``saved``
    is a constant to autograd and is not used then.
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        gamma = focal.gamma
        log_s, log_q = _log_sigmoid(x), _log_sigmoid(-x)
        s, q = torch.sigmoid(x), torch.sigmoid(-x)
        positive = torch.exp(gamma * log_q) * (focal.pos_offset + focal.pos_slope * y)
        negative = torch.exp(gamma * log_s) * (focal.neg_offset + focal.neg_slope * y)
        grad = (positive * (q - gamma * s * log_s) - negative * (s - gamma * q * log_q)) * task_scale
        if weights is not None:
            grad = grad * weights
        return grad if mask is None else torch.where(mask, grad, 0.0)
    if saved is None:
        _, saved = _focal_sums(x, y, focal, weights, mask, keep, with_gradient=True)
        assert saved is not None
    return saved.mul_(task_scale)


class MultiTaskBCE(torch.autograd.Function):
    """Per-task losses ``L_t = scale_t * S_t`` and ``total = factor * sum_t task_weight_t * L_t``.

    ``S_t`` is the masked, weighted sum of task ``t``'s element losses. ``scale`` is a float, a
    ``[T]`` tensor or ``None`` (1); ``factor`` ``None`` skips ``total`` (returned as 0).
    Inputs are already in the compute dtype; ``weights`` is ``[B, T]`` or ``[B, 1]``.

    ``focal`` chooses the kernel, once, where the loss is built: ``None`` for plain BCE (the fast
    one; ``pos_weight`` is then the positive weight), or the :class:`Focal` constants for the focal
    kernel, which take the place of ``pos_weight``. Both kernels form the gradient in the forward,
    from the same passes, and the first backward scales it in place; a second one
    (``retain_graph=True``) forms it again.
    """

    # forward takes ctx itself (no setup_context): with setup_context, Function.apply binds the
    # arguments through inspect.signature on every call, which costs more than the whole
    # forward for small batches. Python floats are kept out of tensor ops where possible: each
    # one becomes a tensor of its own, a cost that shows for small batches.
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        y: torch.Tensor,
        weights: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        pos_weight: torch.Tensor,
        scale: Scale,
        task_weight: torch.Tensor,
        factor: Optional[float],
        focal: Optional[Focal] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Every tensor below is fresh, so in-place updates are safe and save allocations.
        shape = x.shape
        rows = _rows_per_tile(x, y, weights, mask)
        if rows > 1:
            x, y = x.view(-1, rows * shape[1]), y.view(-1, rows * shape[1])
            weights = None if weights is None else weights.view(x.shape)
            mask = None if mask is None else mask.view(x.shape)
            pos_weight = _tiled(pos_weight, rows)
            focal = None if focal is None else focal.tiled(rows)
        # Both kernels sum their losses block by block and form the gradient in the same passes,
        # kept for the backward. The plain kernel does so from _BLOCKED_ENTRIES entries; below, and
        # under torch.compile (which fuses its own loops) and torch.jit.trace (whose sizes are
        # tensors), it runs over the whole block and leaves the gradient to the backward, as the
        # focal one leaves it under torch.compile.
        # (The size last: under torch.jit.trace it is a tensor, which a comparison would freeze.)
        whole = (
            torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None or x.numel() < _BLOCKED_ENTRIES
        )
        with_gradient = ctx.needs_input_grad[0] and not torch.compiler.is_compiling()
        blocked = focal is None and not whole
        # The blocked plain kernel writes the mask's bits per block; the others take them whole.
        keep = None if blocked else keep_bits(mask, x.dtype)
        if blocked:
            ctx.saved_gradient = torch.empty_like(x) if with_gradient else None
            task_losses = _plain_sums(x, y, pos_weight, weights, mask, ctx.saved_gradient)
        elif focal is None:
            task_losses, ctx.saved_gradient = column_sums(_element_losses(x, y, pos_weight, weights, mask, keep)), None
        else:
            task_losses, ctx.saved_gradient = _focal_sums(x, y, focal, weights, mask, keep, with_gradient)
        if rows > 1:
            task_losses = task_losses.view(rows, shape[1]).sum(0)
        if scale is not None:
            task_losses.mul_(scale)
        if factor is None:
            total = task_losses.new_zeros(())
        else:
            total = torch.dot(task_losses, task_weight)
            if factor != 1.0:
                total.mul_(factor)
        scale_tensor = scale if isinstance(scale, torch.Tensor) else None
        ctx.save_for_backward(x, y, weights, mask, keep, pos_weight, scale_tensor, task_weight)
        # Constants of the loss (buffers), kept on ctx: saving them too would cost the plain kernel
        # a little on every backward.
        ctx.focal = focal
        ctx.blocked = blocked
        ctx.tile = (rows, shape)
        ctx.scale = None if scale_tensor is not None else scale
        ctx.factor = factor
        # Usually only `total` is backpropagated: no zero gradient is built for the task losses.
        ctx.set_materialize_grads(False)
        return task_losses, total

    @staticmethod
    def backward(
        ctx: Any, grad_tasks: Optional[torch.Tensor], grad_total: Optional[torch.Tensor]
    ) -> tuple[Optional[torch.Tensor], ...]:
        x, y, weights, mask, keep, pos_weight, scale_tensor, task_weight = ctx.saved_tensors
        # What multiplies d(l_bt)/d(x_bt): d(outputs)/d(S_t) = scale_t (g_t + factor task_weight_t g_total).
        factor: Optional[float] = ctx.factor
        scale: Optional[float] = ctx.scale
        upstream = None
        if grad_total is not None and factor is not None:
            upstream = task_weight * grad_total
            if grad_tasks is None:
                # The usual case: both floats fold into one multiply.
                multiplier = factor if scale is None else factor * scale
                if multiplier != 1.0:
                    upstream.mul_(multiplier)
                scale = None
            else:
                if factor != 1.0:
                    upstream.mul_(factor)
                upstream.add_(grad_tasks)
        elif grad_tasks is not None:
            upstream = grad_tasks
        if upstream is None or not ctx.needs_input_grad[0]:
            return (None,) * 9
        if scale is not None:
            upstream = upstream * scale
        if scale_tensor is not None:
            upstream = upstream * scale_tensor
        focal: Optional[Focal] = ctx.focal
        rows, shape = ctx.tile
        if rows > 1:
            upstream = _tiled(upstream, rows)
        saved, ctx.saved_gradient = ctx.saved_gradient, None  # scaled in place: good for one backward
        if focal is not None:
            grad = _focal_element_gradients(x, y, focal, weights, mask, keep, upstream, saved)
        elif saved is not None and not torch.is_grad_enabled():
            grad = saved.mul_(upstream)
        elif ctx.blocked and not torch.is_grad_enabled():  # a second backward: formed again as the first was
            grad = torch.empty_like(x)
            _plain_sums(x, y, pos_weight, weights, mask, grad)
            grad.mul_(upstream)
        else:  # the whole-block kernel, and create_graph (double backward), out of place for autograd to follow
            grad = _element_gradients(x, y, pos_weight, weights, mask, keep, upstream)
        if rows > 1:
            grad = grad.view(shape)
        return grad, None, None, None, None, None, None, None, None
