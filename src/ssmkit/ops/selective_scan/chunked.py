"""Chunked selective scan in PyTorch: the CPU fast path, with a hand-written backward.

The scan is the linear recurrence ``h_t = a_t * h_{t-1} + x_t`` per channel d and state index n,
with decay ``a_t = exp(delta_t * A)`` and input ``x_t = delta_t * B_t * u_t``. Stepping through it
one position at a time costs one round of small tensor operations per position; here the sequence
is cut into ``nc`` chunks of ``chunk`` consecutive positions and the chunks advance together:

1. Pass 1: starting every chunk from a zero state, step through the ``chunk`` positions (all
   chunks at once) and keep only each chunk's final state ``s_c``.
2. Carries: the states entering the chunks obey the same recurrence one level up,
   ``H_c = exp(A * sum_{t in c} delta_t) * H_{c-1} + s_c``; it is solved by calling the scan
   recursively on the ``nc`` chunk summaries, so the levels form a tree of depth log_chunk(seqlen).
3. Pass 2: step through every chunk again from its true entering state and read out
   ``y_t = sum_n C_t * h_t`` position by position, so the (dim, dstate, seqlen) states are never
   stacked.

The Python loops run about ``2 * chunk`` times per level, not ``seqlen`` times. Pass 2 repeats
pass 1's multiply-adds instead of storing the local states and correcting them with cumulative
decays afterwards, because that correction costs more full-size passes over memory than it saves.
Channels are processed in blocks; within a block, each step forms the decays and inputs of one
position (all chunks at once) in cache-sized buffers and updates the states in place, so nothing
of the block's full (dstate, channels, positions) size is written but what backward must keep.

Backward (:class:`_ChunkedScanFunction`) recomputes each block's states from the states entering
its chunks (the only activations kept besides the inputs), runs the adjoint recurrence
``g_t = C_t * dy_t + a_{t+1} * g_{t+1}`` backwards by the same two passes and carries, and forms
every gradient position by position while its tensors are in cache. Autograd through the loops
would record several operations per position, each keeping full-size tensors.

Numerics: only products of decays ``a_t`` are formed, never the ratio ``exp(S_t) / exp(S_s)`` of
cumulative log-decays that the segment-sum forms use, so nothing overflows however large
``delta * A`` grows: decays in (0, 1] shrink towards 0, which is their correct limit (they are
floored at a value that is zero for all practical purposes, see ``_LOG_DECAY_FLOOR``). The
adjoint recurrence has the same decays and the same guarantee.

Packed sequences (``cu_seqlens``) run as one row: the decay is zeroed at each sequence's first
position (the state restarts there), the sequence's initial state enters through its first input,
and each sequence's last state is read at its last position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ssmkit.ops.common.dt import compute_dtype

# Channels are processed in blocks of about this many (channel, dstate, position) elements, so
# that one position's step (a 1 / chunk slice) stays in cache while the per-operation overhead
# of the loops is amortised. With a backward to follow, 2**20 and 2**22 measured slower (its
# loops keep more buffers of a step's size in cache); for the forward alone, twice as many
# (10% faster at seqlen 512, 35% at seqlen 8192, where blocks of 2**21 hold only 16 channels).
_BLOCK_ELEMENTS = 1 << 21
_FORWARD_ONLY_BLOCK_FACTOR = 2

# Chunk length at the top level of the tree (the deeper levels use about sqrt of their length);
# 16 and 64 measured slower at seqlen 2048.
_CHUNK = 32

# Log-decays below this are raised to it: exp() of very negative numbers, and arithmetic on the
# subnormal numbers it returns, run one to two orders of magnitude slower on CPUs, while a decay
# of exp(-60) ~ 9e-27 (fp32) or exp(-600) ~ 3e-261 (fp64) is already zero next to any state it
# multiplies. Both floors sit far above their precision's subnormal range, so products of a few
# floored decays stay normal too.
_LOG_DECAY_FLOOR = {torch.float32: -60.0, torch.float64: -600.0}


class _Workspace:
    """Named buffers reused by every block (and step) of one call.

    Writing a large result into freshly allocated memory costs a page fault per 4 KiB page,
    about as much as the arithmetic itself; the blocks' per-position buffers and the states that
    backward recomputes go into these instead.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel].view(shape)


def _needs_floor(delta: torch.Tensor, A: torch.Tensor) -> bool:
    """Whether some delta * A can fall below _LOG_DECAY_FLOOR (the product's extremes sit at
    corners of the box [min delta, max delta] x [min A, max A]); checked once per call, it lets
    the top level skip a clamp at every step. (The deeper levels, whose sums of delta are larger and whose
    tensors are small, always clamp.)"""
    if torch.compiler.is_compiling():
        return True  # always clamp inside a compiled graph: a data-dependent branch would break it
    floor = _LOG_DECAY_FLOOR[delta.dtype]
    with torch.no_grad():
        delta_lo, delta_hi = torch.aminmax(delta)
        A_lo, A_hi = torch.aminmax(A)
        corners = torch.stack([delta_lo * A_lo, delta_lo * A_hi, delta_hi * A_lo, delta_hi * A_hi])
        return bool(corners.min() < floor)


def _to_chunks(t: torch.Tensor, chunk: int, pad_value: float = 0.0) -> torch.Tensor:
    """(L, *rest) -> (chunk, nc, *rest), contiguous, padded at the end to nc * chunk positions.

    Position j of chunk c (time c * chunk + j) sits at [j, c], so the values of one position
    within every chunk, [j], form one contiguous block that the pass loops step through.
    """
    length = t.shape[0]
    nc = -(-length // chunk)
    if nc * chunk != length:
        padding = t.new_full((nc * chunk - length, *t.shape[1:]), pad_value)
        t = torch.cat([t, padding], dim=0)
    return t.unflatten(0, (nc, chunk)).transpose(0, 1).contiguous()


def _from_chunks(t: torch.Tensor, length: int) -> torch.Tensor:
    """(chunk, nc, *rest) -> (length, *rest): the inverse of :func:`_to_chunks`, padding dropped."""
    return t.transpose(0, 1).flatten(0, 1)[:length]


def _block_to_chunks(t: torch.Tensor, chunk: int) -> torch.Tensor:
    """(rows, channels, L) -> (chunk, nc, rows, channels), contiguous, zero-padded at the end.

    One block at a time, so the transposing copy stays in cache.
    """
    length = t.shape[-1]
    nc = -(-length // chunk)
    if nc * chunk != length:
        t = F.pad(t, (0, nc * chunk - length))
    return t.unflatten(-1, (nc, chunk)).permute(3, 2, 0, 1).contiguous()


def _block_from_chunks(t: torch.Tensor, length: int) -> torch.Tensor:
    """(chunk, nc, rows, channels) -> (rows, channels, length): the inverse of _block_to_chunks."""
    return t.permute(2, 3, 1, 0).flatten(-2)[..., :length]


# Values added to the states at a few positions, by position within the chunks:
# {j: [(chunk indices (k,), values (k, rows, dstate, channels)), ...]}. They carry the packed
# sequences' initial states into the forward and the last states' cotangents into the backward.
Extras = dict[int, list[tuple[torch.Tensor, torch.Tensor]]]


def _decays(
    delta: torch.Tensor,
    A: torch.Tensor,
    keep: torch.Tensor | None,
    floor: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """exp(max(delta * A, floor)) * keep, into ``out`` if given.

    delta: (*lead, *rows, 1, channels)   A: (dstate, channels)   keep: (*lead,) (0 where the state
    restarts) or None. Returns (*lead, *rows, dstate, channels).
    """
    decay = torch.mul(delta, A, out=out)
    if floor:
        decay.clamp_(min=_LOG_DECAY_FLOOR[decay.dtype])
    decay.exp_()
    if keep is not None:
        decay.mul_(keep.view(*keep.shape, *([1] * (decay.dim() - keep.dim()))))
    return decay


def _add_extras(h: torch.Tensor, extras: Extras | None, j: int) -> None:
    """h (nc, rows, dstate, channels) += the extras at position j of the chunks, in place."""
    if extras is not None and j in extras:
        for chunk_ids, values in extras[j]:
            h.index_add_(0, chunk_ids, values)


def _scan(
    delta: torch.Tensor, A: torch.Tensor, x: torch.Tensor, h0: torch.Tensor, keep: torch.Tensor | None
) -> torch.Tensor:
    """States of h_t = exp(delta_t * A) * keep_t * h_{t-1} + x_t for every t: the levels above the
    top one, on chunk summaries, by the same two passes (and recursively).

    delta: (L, *rows, 1, channels)   A: (dstate, channels)   x: (L, *rows, dstate, channels)
    h0: (*rows, dstate, channels)   keep: (L,) or None.   Returns h: (L, *rows, dstate, channels).
    """
    length = delta.shape[0]
    # About sqrt(L) positions per chunk balances the two passes against the level below; short
    # sequences of summaries are stepped through directly (one chunk), as another level's fixed
    # costs would exceed the steps it saves.
    chunk = length if length <= 16 else math.ceil(length**0.5)
    keep = _to_chunks(keep, chunk, pad_value=1.0) if keep is not None else None
    delta, x = _to_chunks(delta, chunk), _to_chunks(x, chunk)
    decay = _decays(delta, A, keep, floor=True)
    nc = delta.shape[1]
    if nc > 1:
        local_end = x[0].clone()
        for j in range(1, chunk):
            torch.addcmul(x[j], decay[j], local_end, out=local_end)
        # A chunk with a restart inside forgets its entering state: its chunk-level decay is 0.
        chunk_keep = keep.amin(dim=0) if keep is not None else None
        states = _scan(delta.sum(dim=0), A, local_end, h0, chunk_keep)
        h = torch.cat([h0[None], states[:-1]], dim=0)
    else:
        h = h0[None]
    out = torch.empty_like(x)
    for j in range(chunk):
        h = torch.addcmul(x[j], decay[j], h, out=out[j])
    return _from_chunks(out, length)


class _Block:
    """One block of batch rows and channels (of one group) in the chunked layout, with the
    per-position steps that the forward and backward loops share.

    Nothing of the block's full (chunk, nc, rows, dstate, channels) size is formed here: the
    decays exp(delta_j * A) and the inputs B_j * delta_j * u_j of position j (all chunks at once)
    are made when a step needs them, in reused buffers of one position's size that stay in
    cache. Writing them out for the whole block and reading them back costs more: those passes
    run at memory speed, the exp and multiply-adds of one position at cache speed.
    """

    def __init__(self, plan: _Plan, block, delta, delta_u, A, B_chunks, C_chunks, entering, ws) -> None:
        b0, b1, g, d0, d1 = block
        chunk = plan.chunk
        self.plan, self.ws = plan, ws
        # delta and delta * u: (chunk, nc, rows, 1, channels); B and C: (chunk, nc, rows, dstate, 1)
        self.delta = _block_to_chunks(delta[b0:b1, d0:d1], chunk)[..., None, :]
        self.delta_u = _block_to_chunks(delta_u[b0:b1, d0:d1], chunk)[..., None, :]
        self.B = B_chunks[:, :, b0:b1, g, :, None]
        self.C = C_chunks[:, :, b0:b1, g, :, None]
        self.A = A[d0:d1].T.contiguous()  # (dstate, channels)
        self.step_shape = (plan.nc, b1 - b0, plan.dstate, d1 - d0)
        self.starts: Extras | None = None
        if entering is not None:  # the packed sequences' decayed initial states, at their starts
            values = entering[:, None, d0:d1].transpose(-1, -2)  # (num_nonempty, 1, dstate, channels)
            by_offset = plan.packed.starts_by_offset.items()
            self.starts = {j: [(chunk_ids, values[rows])] for j, (chunk_ids, rows) in by_offset}

    def buffer(self, name: str) -> torch.Tensor:
        """A reused buffer of one position's size, (nc, rows, dstate, channels)."""
        return self.ws.take(name, self.step_shape, self.delta)

    def decay(self, j: int) -> torch.Tensor:
        """exp(delta_j * A) * keep_j: (nc, rows, dstate, channels), valid until the next call."""
        keep = self.plan.keep[j] if self.plan.keep is not None else None
        return _decays(self.delta[j], self.A, keep, self.plan.floor, out=self.buffer("decay"))

    def advance(self, h: torch.Tensor, decay: torch.Tensor, j: int) -> torch.Tensor:
        """h <- decay * h + B_j * delta_j * u_j (+ the starts' extras), in place."""
        h.mul_(decay).addcmul_(self.B[j], self.delta_u[j])
        _add_extras(h, self.starts, j)
        return h


def _scan_top(
    blk: _Block, h0: torch.Tensor, ends: dict[int, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The top level of the forward over one block: h_t = decay_t * h_{t-1} + B_t * delta_t * u_t,
    y_t = sum_n C_t * h_t, by the two passes around the level above.

    h0: (rows, dstate, channels), the state before the first position
    ends: {j: chunk indices c}: gather the states at positions (j, c), in the order given

    Returns y: (chunk, nc, rows, channels); the state after the last position (rows, dstate,
    channels); the gathered states, one (len(c), rows, dstate, channels) tensor per entry of
    ``ends``; and the states entering the chunks, (nc, rows, dstate, channels).
    """
    chunk, nc = blk.delta.shape[:2]
    keep = blk.plan.keep
    if nc > 1:
        # Pass 1: each chunk's own contribution to its final state (from a zero entering state,
        # which the first position's decay leaves zero).
        local_end = torch.mul(blk.B[0], blk.delta_u[0])
        _add_extras(local_end, blk.starts, 0)
        for j in range(1, chunk):
            blk.advance(local_end, blk.decay(j), j)
        # A chunk with a restart inside forgets its entering state: its chunk-level decay is 0.
        chunk_keep = keep.amin(dim=0) if keep is not None else None
        states = _scan(blk.delta.sum(dim=0), blk.A, local_end, h0, chunk_keep)  # (nc, rows, dstate, channels)
        entering = torch.cat([h0[None], states[:-1]], dim=0)
    else:
        entering = h0[None].clone()

    # Pass 2: every chunk from its entering state, reading out y. The readout sum_n C * h is a
    # batched vector-matrix product.
    h = entering.clone()
    y = h.new_empty(chunk, nc, h.shape[1], 1, h.shape[-1])
    C = blk.C.transpose(-1, -2)  # (chunk, nc, rows, 1, dstate)
    gathered = []
    for j in range(chunk):
        blk.advance(h, blk.decay(j), j)
        torch.matmul(C[j], h, out=y[j])
        if ends is not None and j in ends:
            gathered.append(h.index_select(0, ends[j]))
    return y.squeeze(-2), h[-1], gathered, entering


def _states_again(
    blk: _Block, entering: torch.Tensor, out: torch.Tensor, dy: torch.Tensor, grad_C: torch.Tensor
) -> torch.Tensor:
    """Every state of a block again, from the states entering the chunks (one pass, no carries):
    out[j] is the state before position j, out[j + 1] the one after it. While each state is in
    cache, also grad_C[j] = sum_d h_j * dy_j.

    entering: (nc, rows, dstate, channels)   out: (chunk + 1, nc, rows, dstate, channels)
    dy: (chunk, nc, rows, 1, channels)   grad_C: (chunk, nc, rows, dstate), written.
    """
    out[0] = entering
    product = blk.buffer("product")
    for j in range(blk.delta.shape[0]):
        torch.mul(blk.decay(j), out[j], out=out[j + 1]).addcmul_(blk.B[j], blk.delta_u[j])
        _add_extras(out[j + 1], blk.starts, j)
        # A product and a sum: a batched matrix-vector product of these shapes measured slower.
        torch.sum(torch.mul(out[j + 1], dy[j], out=product), dim=-1, out=grad_C[j])
    return out


def _backward_top(
    blk: _Block,
    entering: torch.Tensor,
    dy: torch.Tensor,
    cotangents: Extras,
    start_ids: dict[int, tuple[torch.Tensor, torch.Tensor]] | None,
) -> dict[str, torch.Tensor]:
    """The gradients of one block of the top level, given the output cotangents.

    entering: (nc, rows, dstate, channels), the states entering the chunks (saved by forward)
    dy: (chunk, nc, rows, 1, channels)   cotangents: the last states' cotangents, added to the
    adjoint where those states were read (see Extras)
    start_ids: {j: (chunk indices, rows of entering)} of the packed sequences' first positions,
    to read the gradients of their injected initial states; None when there are none

    The adjoint g_t = dL/dh_t obeys g_t = C_t * dy_t (+ cotangents) + a_{t+1} * g_{t+1}: run
    backwards with the forward's two levels: each chunk's contribution to the adjoint at its
    first position from a zero carry (pass 1), the carries between chunks by the forward
    recurrence over the reversed chunk summaries (their decays recomputed from sums of delta, so
    only products of decays are formed), then every chunk again from its true carry (pass 2),
    which also forms every gradient of the position while its tensors are in cache:

        d(delta * A)_t = a_t * g_t * h_{t-1}    (over n times A for delta, over t times delta for A)
        dx_t = g_t with x_t = B_t * delta_t * u_t;   dC_t = sum_d h_t * dy_t;   dh0 = a_0 * g_0

    Returns, as (chunk, nc, rows, ...) tensors: "delta" (.., channels), the part through the
    decays; "x_B" (.., channels), sum_n B * g, from which the caller forms the gradients of delta
    and u through x; "B" (.., dstate); "C" (.., dstate). Then "A" (dstate, channels), "h0" (rows,
    dstate, channels) and "starts" {j: (num_at_j, 1, dstate, channels)} (empty without start_ids).
    """
    chunk, nc = blk.delta.shape[:2]
    last = chunk - 1
    rows, channels = blk.step_shape[1], blk.step_shape[3]
    new = dy.new_empty
    grad_delta = new(chunk, nc, rows, channels)  # first the part through the decays
    grad_x_B = new(chunk, nc, rows, 1, channels)  # sum_n B * g
    grad_B, grad_C = new(chunk, nc, rows, blk.plan.dstate), new(chunk, nc, rows, blk.plan.dstate)
    states = blk.ws.take("states", (chunk + 1, *blk.step_shape), dy)
    _states_again(blk, entering, states, dy, grad_C)

    carry = None  # what enters each chunk's last position from the chunks after it
    if nc > 1:
        local_first = torch.zeros(blk.step_shape, dtype=dy.dtype, device=dy.device)
        for j in range(last, -1, -1):
            if j < last:
                local_first.mul_(blk.decay(j + 1))
            local_first.addcmul_(blk.C[j], dy[j])
            _add_extras(local_first, cotangents, j)
        # From the first position of chunk c to that of chunk c + 1 the adjoint decays by the
        # decays at positions 1 .. chunk - 1 of chunk c and 0 of chunk c + 1.
        delta, keep = blk.delta, blk.plan.keep
        link = delta[0, 1:] + delta[1:].sum(dim=0)[:-1]  # (nc - 1, rows, 1, channels)
        link_keep = None
        if keep is not None:
            link_keep = keep[0, 1:] if chunk == 1 else torch.minimum(keep[0, 1:], keep[1:].amin(dim=0)[:-1])
            link_keep = torch.cat([link_keep.new_ones(1), link_keep.flip(0)])
        # In reversed chunk order the first summary has nothing after it: its link is unused.
        reversed_links = torch.cat([torch.zeros_like(link[:1]), link.flip(0)])
        zero = torch.zeros_like(local_first[0])
        first = _scan(reversed_links, blk.A, local_first.flip(0), zero, link_keep).flip(0)
        carry = torch.zeros_like(local_first)
        torch.mul(blk.decay(0)[1:], first[1:], out=carry[:-1])

    through_decay_delta = torch.zeros(blk.step_shape, dtype=dy.dtype, device=dy.device)  # sum_j delta_j * q_j
    B_row = blk.B.transpose(-1, -2)
    g, decayed, through_decay = blk.buffer("g"), blk.buffer("decayed"), blk.buffer("through_decay")
    grad_starts = {}
    for j in range(last, -1, -1):
        if j == last:
            torch.mul(blk.C[j], dy[j], out=g)
            if carry is not None:
                g.add_(carry)
        else:
            torch.addcmul(decayed, blk.C[j], dy[j], out=g)  # decayed = a_{j+1} * g_{j+1}
        _add_extras(g, cotangents, j)
        if start_ids is not None and j in start_ids:
            grad_starts[j] = g.index_select(0, start_ids[j][0])
        # A product and a sum: a batched matrix-vector product of these shapes measured slower.
        torch.sum(torch.mul(g, blk.delta_u[j], out=through_decay), dim=-1, out=grad_B[j])
        torch.matmul(B_row[j], g, out=grad_x_B[j])
        torch.mul(blk.decay(j), g, out=decayed)
        torch.mul(decayed, states[j], out=through_decay)
        through_decay_delta.addcmul_(through_decay, blk.delta[j])
        torch.sum(through_decay.mul_(blk.A), dim=-2, out=grad_delta[j])

    grad_x_B = grad_x_B.squeeze(-2)
    return {
        "delta": grad_delta,
        "x_B": grad_x_B,
        "B": grad_B,
        "C": grad_C,
        "A": through_decay_delta.sum(dim=(0, 1)),
        "h0": decayed[0],
        "starts": grad_starts,
    }


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba-1 selective scan by the chunked two-pass method (no loop over time steps).

    u, delta: (batch, dim, seqlen)       A: (dim, dstate)
    B, C: (batch, ngroups, dstate, seqlen); channel d reads group d // (dim // ngroups)
    D, delta_bias: (dim,)                z: (batch, dim, seqlen)
    initial_state: (batch, dim, dstate), or (num_seqs, dim, dstate) with cu_seqlens
    cu_seqlens: (num_seqs + 1,) integer boundaries of packed sequences (then batch == 1)
    chunk_size: positions per chunk at the top level, a speed knob (results change only by
    rounding); None picks one from seqlen

    Same semantics, arguments and results as
    :func:`ssmkit.ops.selective_scan.reference.selective_scan_reference`: out (batch, dim, seqlen)
    in the dtype of u; last_state (batch, dim, dstate), or (num_seqs, dim, dstate) with cu_seqlens,
    in the compute dtype (fp32, or fp64 for fp64 inputs), when return_last_state, else None.
    Arguments are assumed valid (the public function checks them).

    The scan itself is one autograd node (:class:`_ChunkedScanFunction`) with a hand-written
    backward; the cheap elementwise steps around it (bias, softplus, D, z, casts) are left to
    autograd.
    """
    compute = compute_dtype(u.dtype)
    batch, dim, seqlen = u.shape
    ngroups, dstate = B.shape[1], B.shape[2]

    u_c, delta_c, A_c = u.to(compute), delta.to(compute), A.to(compute)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)

    if seqlen == 0:
        y = u_c.new_zeros(batch, dim, 0)
        if cu_seqlens is not None:
            last = _Packed(cu_seqlens, 0, 1, compute).last_states(None, initial_state, dim, dstate)
        elif initial_state is not None:
            last = initial_state.to(compute)
        else:
            last = u_c.new_zeros(batch, dim, dstate)
    else:
        chunk = max(1, min(chunk_size or _default_chunk(seqlen), seqlen))
        packed = _Packed(cu_seqlens, seqlen, chunk, compute) if cu_seqlens is not None else None
        entering = None
        if packed is not None:
            h0 = u_c.new_zeros(1, dim, dstate)  # each sequence's own initial state enters at its start
            if initial_state is not None:
                entering = packed.entering(initial_state.to(compute), delta_c[0], A_c)
        else:
            h0 = initial_state.to(compute) if initial_state is not None else u_c.new_zeros(batch, dim, dstate)
        tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        block_elements = _BLOCK_ELEMENTS * (1 if needs_grad else _FORWARD_ONLY_BLOCK_FACTOR)
        shape = (batch, dim, ngroups, dstate, seqlen)
        plan = _Plan(shape, chunk, packed, _needs_floor(delta_c, A_c), block_elements)
        y, last, gathered = _ChunkedScanFunction.apply(
            delta_c, u_c, A_c, B.to(compute), C.to(compute), h0, entering, plan
        )
        if packed is not None:
            last = packed.last_states(gathered, initial_state, dim, dstate)

    if D is not None:
        y = y + D.to(compute)[:, None] * u_c
    if z is not None:
        y = y * F.silu(z.to(compute))
    out = y.to(u.dtype)
    return (out, last) if return_last_state else (out, None)


def _default_chunk(seqlen: int) -> int:
    """Top-level chunk length: _CHUNK, shortened for short sequences to about 2 * sqrt(seqlen) so
    that they still have several chunks (a chunk as long as the sequence would be a
    position-by-position loop); at seqlen 64 (chunks of 16) this measured faster than 8 or 32."""
    return max(1, min(_CHUNK, 2 * math.ceil(seqlen**0.5)))


class _Plan:
    """How one call is cut: the top-level chunk length, the blocks of batch rows and channels that
    are processed one at a time (a block never spans two groups), packing, and flooring."""

    def __init__(
        self,
        shape: tuple[int, int, int, int, int],
        chunk: int,
        packed: _Packed | None,
        floor: bool,
        block_elements: int,
    ) -> None:
        self.batch, self.dim, self.ngroups, self.dstate, self.seqlen = shape
        self.chunk, self.packed, self.floor = chunk, packed, floor
        self.nc = -(-self.seqlen // chunk)
        per_group = self.dim // self.ngroups
        self.channels = max(1, min(per_group, block_elements // (self.dstate * self.seqlen)))
        self.rows = max(1, min(self.batch, block_elements // (self.channels * self.dstate * self.seqlen)))
        self.keep = packed.keep if packed is not None else None

    def blocks(self):
        """(b0, b1, g, d0, d1): batch rows [b0, b1) and channels [d0, d1) of group g."""
        per_group = self.dim // self.ngroups
        for b0 in range(0, self.batch, self.rows):
            b1 = min(self.batch, b0 + self.rows)
            for g in range(self.ngroups):
                for d0 in range(g * per_group, (g + 1) * per_group, self.channels):
                    yield b0, b1, g, d0, min((g + 1) * per_group, d0 + self.channels)


def _chunked_inputs(plan: _Plan, delta, u, B, C):
    """delta * u (batch, dim, seqlen), and B and C chunked once (they have no channel dimension):
    (chunk, nc, batch, ngroups, dstate)."""
    B_chunks = _to_chunks(B.permute(3, 0, 1, 2).contiguous(), plan.chunk)
    C_chunks = _to_chunks(C.permute(3, 0, 1, 2).contiguous(), plan.chunk)
    return delta * u, B_chunks, C_chunks


class _ChunkedScanFunction(torch.autograd.Function):
    """The scan h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t, y_t = sum_n C_t * h_t as
    one autograd node.

    delta, u: (batch, dim, seqlen)   A: (dim, dstate)   B, C: (batch, ngroups, dstate, seqlen)
    h0: (batch, dim, dstate)   entering: (num_nonempty, dim, dstate) or None, the packed
    sequences' initial states already decayed by their first step, added at their first
    positions. All in the compute dtype. Returns y (batch, dim, seqlen), the state after the last
    position (batch, dim, dstate), and the states at the packed sequences' last positions
    (num_nonempty, dim, dstate) in ``plan.packed.order`` (empty when not packed).

    Forward saves its inputs and the states entering each chunk (1 / chunk of all the states);
    backward recomputes the rest, one block at a time (see :func:`_backward_top`). Autograd
    through the chunked loops would record several operations per position, each keeping its
    inputs and allocating full-size gradients in backward.
    """

    @staticmethod
    def forward(ctx, delta, u, A, B, C, h0, entering, plan):
        batch, dim, seqlen = u.shape
        delta_u, B_chunks, C_chunks = _chunked_inputs(plan, delta, u, B, C)
        ws = _Workspace()
        y = u.new_empty(batch, dim, seqlen)
        last = u.new_empty(batch, dim, plan.dstate)
        packed = plan.packed
        gathered = u.new_empty(packed.num_nonempty if packed is not None else 0, dim, plan.dstate)
        entering_states = []
        for block in plan.blocks():
            b0, b1, _, d0, d1 = block
            blk = _Block(plan, block, delta, delta_u, A, B_chunks, C_chunks, entering, ws)
            h0_blk = h0[b0:b1, d0:d1].transpose(-1, -2)
            y_blk, last_blk, gathered_blk, states_in = _scan_top(blk, h0_blk, packed.ends if packed else None)
            y[b0:b1, d0:d1] = _block_from_chunks(y_blk, seqlen)
            last[b0:b1, d0:d1] = last_blk.transpose(-1, -2)
            if gathered_blk:
                gathered[:, d0:d1] = torch.cat(gathered_blk, dim=0)[:, 0].transpose(-1, -2)
            entering_states.append(states_in)
        ctx.save_for_backward(delta, u, A, B, C, entering, *entering_states)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        return y, last, gathered

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_last, grad_gathered):
        delta, u, A, B, C, entering, *entering_states = ctx.saved_tensors
        plan: _Plan = ctx.plan
        packed = plan.packed
        chunk, nc, seqlen = plan.chunk, plan.nc, plan.seqlen
        delta_u, B_chunks, C_chunks = _chunked_inputs(plan, delta, u, B, C)
        grad_delta, grad_u, grad_A = torch.empty_like(delta), torch.empty_like(u), torch.zeros_like(A)
        grad_B_chunks, grad_C_chunks = torch.zeros_like(B_chunks), torch.zeros_like(C_chunks)
        grad_h0 = u.new_zeros(plan.batch, plan.dim, plan.dstate) if packed is None else None
        grad_entering = torch.zeros_like(entering) if entering is not None else None
        if grad_y is None:
            grad_y = torch.zeros_like(u)
        ws = _Workspace()
        for block, states_in in zip(plan.blocks(), entering_states):
            b0, b1, g, d0, d1 = block
            blk = _Block(plan, block, delta, delta_u, A, B_chunks, C_chunks, entering, ws)
            # The last states' cotangents enter the adjoint where those states were read.
            cotangents: Extras = {}
            if packed is None and grad_last is not None:
                last_chunk = torch.tensor([nc - 1], device=u.device)
                cotangents[chunk - 1] = [(last_chunk, grad_last[None, b0:b1, d0:d1].transpose(-1, -2))]
            elif packed is not None and grad_gathered is not None:
                offset = 0
                for j, chunk_ids in packed.ends.items():
                    part = grad_gathered[offset : offset + len(chunk_ids), None, d0:d1].transpose(-1, -2)
                    cotangents[j] = [(chunk_ids, part)]
                    offset += len(chunk_ids)
            dy = _block_to_chunks(grad_y[b0:b1, d0:d1], chunk)[..., None, :]  # (chunk, nc, rows, 1, channels)
            start_ids = packed.starts_by_offset if grad_entering is not None else None
            grads = _backward_top(blk, states_in, dy, cotangents, start_ids)

            u_blk = _block_to_chunks(u[b0:b1, d0:d1], chunk)
            grad_delta[b0:b1, d0:d1] = _block_from_chunks(
                grads["delta"].addcmul_(grads["x_B"], u_blk), seqlen
            )
            grad_u[b0:b1, d0:d1] = _block_from_chunks(grads["x_B"].mul_(blk.delta.squeeze(-2)), seqlen)
            grad_A[d0:d1] += grads["A"].T
            grad_B_chunks[:, :, b0:b1, g] += grads["B"]
            grad_C_chunks[:, :, b0:b1, g] += grads["C"]
            if grad_h0 is not None:
                grad_h0[b0:b1, d0:d1] = grads["h0"].transpose(-1, -2)
            for j, at_starts in grads["starts"].items():
                grad_entering[packed.starts_by_offset[j][1], d0:d1] = at_starts[:, 0].transpose(-1, -2)

        grad_B = _from_chunks(grad_B_chunks, seqlen).permute(1, 2, 3, 0)
        grad_C = _from_chunks(grad_C_chunks, seqlen).permute(1, 2, 3, 0)
        return grad_delta, grad_u, grad_A, grad_B, grad_C, grad_h0, grad_entering, None


class _Packed:
    """Bookkeeping for packed sequences in the chunked layout (host-side, from cu_seqlens).

    keep: (chunk, nc), 0 at each non-empty sequence's first position (the state restarts there).
    starts_by_offset: {j: (chunk indices, rows of the non-empty sequences)}: the first positions
    grouped by their offset j within the chunks.
    ends: {j: chunk indices}: the last positions of the non-empty sequences, grouped by their
    offset j within the chunks, in the order that ``order`` lists their sequence indices.
    """

    def __init__(self, cu_seqlens: torch.Tensor, seqlen: int, chunk: int, compute: torch.dtype) -> None:
        device = cu_seqlens.device
        bounds = [int(v) for v in cu_seqlens.tolist()]
        self.num_seqs = len(bounds) - 1
        nonempty = [i for i in range(self.num_seqs) if bounds[i + 1] > bounds[i]]
        self.num_nonempty = len(nonempty)
        self.ids = torch.tensor(nonempty, dtype=torch.long, device=device)
        self.starts = torch.tensor([bounds[i] for i in nonempty], dtype=torch.long, device=device)
        self.nc = -(-seqlen // chunk)
        by_start: dict[int, list[tuple[int, int]]] = {}
        for row, start in enumerate(bounds[i] for i in nonempty):
            by_start.setdefault(start % chunk, []).append((start // chunk, row))
        self.starts_by_offset: dict[int, tuple[torch.Tensor, torch.Tensor]] = {
            j: (
                torch.tensor([c for c, _ in pairs], dtype=torch.long, device=device),
                torch.tensor([row for _, row in pairs], dtype=torch.long, device=device),
            )
            for j, pairs in by_start.items()
        }
        keep = torch.ones(seqlen, dtype=compute, device=device)
        keep[self.starts] = 0.0
        self.keep = _to_chunks(keep, chunk, pad_value=1.0) if seqlen > 0 else None
        by_offset: dict[int, list[tuple[int, int]]] = {}
        for i in nonempty:
            last = bounds[i + 1] - 1
            by_offset.setdefault(last % chunk, []).append((last // chunk, i))
        self.ends: dict[int, torch.Tensor] = {}
        order: list[int] = []
        for j, pairs in sorted(by_offset.items()):
            self.ends[j] = torch.tensor([c for c, _ in pairs], dtype=torch.long, device=device)
            order.extend(i for _, i in pairs)
        self.order = torch.tensor(order, dtype=torch.long, device=device)
        self.chunk = chunk
        self.compute = compute

    def entering(
        self, initial_state: torch.Tensor, delta: torch.Tensor, A: torch.Tensor
    ) -> torch.Tensor | None:
        """Each non-empty sequence's initial state decayed by its first step, to be added to its
        first input: with the decay zeroed there, h_start = exp(delta * A) * h0_i + x_start, as if
        the sequence ran alone.

        initial_state: (num_seqs, dim, dstate)   delta: (dim, seqlen)   A: (dim, dstate).
        Returns (num_nonempty, dim, dstate), or None when every sequence is empty.
        """
        if self.starts.numel() == 0:
            return None
        decay = torch.exp(delta[:, self.starts].T[:, :, None] * A)  # (num_nonempty, dim, dstate)
        return decay * initial_state[self.ids]

    def last_states(
        self, gathered: torch.Tensor | None, initial_state: torch.Tensor | None, dim: int, dstate: int
    ) -> torch.Tensor:
        """(num_seqs, dim, dstate) from the states gathered at the sequences' last positions,
        (num_nonempty, dim, dstate) in self.order; an empty sequence never ran, so its last state
        is its initial state (or zero)."""
        if initial_state is not None:
            result = initial_state.to(self.compute)
        else:
            result = torch.zeros(self.num_seqs, dim, dstate, dtype=self.compute, device=self.ids.device)
        if gathered is None or gathered.shape[0] == 0:
            return result
        return result.index_copy(0, self.order, gathered.to(result.dtype))
