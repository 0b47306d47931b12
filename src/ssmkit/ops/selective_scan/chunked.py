"""Chunked selective scan in PyTorch: the CPU fast path, differentiable by autograd.

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
   stacked (autograd still keeps what its backward needs).

The Python loops run about ``2 * chunk`` times per level, not ``seqlen`` times. Pass 2 repeats
pass 1's multiply-adds instead of storing the local states and correcting them with cumulative
decays afterwards, because that correction costs more full-size passes over memory than it saves.
Channels are processed in blocks so that one block's tensors stay in cache; without autograd the
blocks share their large buffers and the states are updated in place.

Numerics: only products of decays ``a_t`` are formed, never the ratio ``exp(S_t) / exp(S_s)`` of
cumulative log-decays that the segment-sum forms use, so nothing overflows however large
``delta * A`` grows: decays in (0, 1] shrink towards 0, which is their correct limit (they are
floored at a value that is zero for all practical purposes, see ``_LOG_DECAY_FLOOR``).

Packed sequences (``cu_seqlens``) run as one row: the decay is zeroed at each sequence's first
position (the state restarts there), the sequence's initial state enters through its first input,
and each sequence's last state is read at its last position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ssmkit.ops.common.dt import compute_dtype

# Channels are processed in blocks of about this many (channel, dstate, position) elements: small
# enough for a block's tensors to stay in the last-level cache, large enough that the
# per-operation overhead of the pass loops is amortised (2**20 and 2**22 measured slower).
_BLOCK_ELEMENTS = 1 << 21

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
    """Buffers for a block's two large tensors (decays and inputs), reused by every block when no
    backward will follow.

    Writing a multi-megabyte result into freshly allocated memory costs a page fault per 4 KiB
    page, about as much as the arithmetic itself. Without autograd nothing needs a block's
    tensors once the block is done, so they go into these buffers instead; under autograd
    (workspace None) every result is a fresh tensor, since the backward keeps them all.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel].view(shape)


def _mul(a: torch.Tensor, b: torch.Tensor, ws: _Workspace | None, name: str) -> torch.Tensor:
    """a * b, written into the workspace buffer ``name`` when there is a workspace."""
    if ws is None:
        return a * b
    return torch.mul(a, b, out=ws.take(name, torch.broadcast_shapes(a.shape, b.shape), a))


def _needs_floor(delta: torch.Tensor, A: torch.Tensor) -> bool:
    """Whether some delta * A can fall below _LOG_DECAY_FLOOR (the product's extremes sit at
    corners of the box [min delta, max delta] x [min A, max A]); checked once per call, it lets
    the top level skip a full pass. (The deeper levels, whose sums of delta are larger and whose
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


def _scan_chunks(
    delta: torch.Tensor,
    A: torch.Tensor,
    x: torch.Tensor,
    h0: torch.Tensor,
    keep: torch.Tensor | None,
    C: torch.Tensor | None,
    ends: dict[int, torch.Tensor] | None = None,
    ws: _Workspace | None = None,
    floor: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Solve h_t = exp(delta_t * A) * keep_t * h_{t-1} + x_t over chunked time.

    The state index comes before the channel index, so that the decays and inputs are outer
    products over a contiguous channel axis and the readout is a vector-matrix product.

    delta: (chunk, nc, *rows, 1, channels)      A: (dstate, channels)
    x: (chunk, nc, *rows, dstate, channels)     h0: (*rows, dstate, channels), the state before
    the first position
    keep: (chunk, nc) with 0 where the state restarts, 1 elsewhere; None means no restarts
    C: (chunk, nc, *rows, 1, dstate), or None
    ends: {j: chunk indices c}: gather the states at positions (j, c), in the order given
    ws: reusable buffers for the decays, or None under autograd; only with C (the states are
    returned, so they cannot be overwritten in place)
    floor: raise the log-decays to _LOG_DECAY_FLOOR (False when none can be below it)

    Returns, with C, y: (chunk, nc, *rows, channels) where y = sum_n C * h; without C, the
    states h: (chunk, nc, *rows, dstate, channels). Then the state after the last position,
    (*rows, dstate, channels), and the gathered states, one (len(c), *rows, dstate, channels)
    tensor per entry of ``ends``, in its order.
    """
    assert ws is None or C is not None, "states are returned, so they cannot be updated in place"
    chunk, nc = delta.shape[:2]
    log_decay = _mul(delta, A, ws, "decay")  # (chunk, nc, *rows, dstate, channels)
    if floor:
        log_decay.clamp_(min=_LOG_DECAY_FLOOR[log_decay.dtype])
    decay = log_decay.exp_()
    if keep is not None:
        decay = _mul(decay, keep.view(chunk, nc, *([1] * (decay.dim() - 2))), ws, "decay")

    # Per-position views. unbind, not x[j]: under autograd each x[j] would get its own full-size
    # zero-filled gradient in backward (chunk of them), unbind's backward stacks them once.
    xs, decays = x.unbind(0), decay.unbind(0)
    # Each step h <- x_j + decay_j * h. Without autograd it overwrites h in place (h is then always
    # a tensor of our own: a clone or a concatenation), which saves an allocation per step.
    in_place = ws is not None
    if nc > 1:
        # Pass 1: each chunk's own contribution to its final state (from a zero entering state).
        local_end = xs[0].clone()
        for j in range(1, chunk):
            local_end = torch.addcmul(xs[j], decays[j], local_end, out=local_end if in_place else None)
        # A chunk with a restart inside forgets its entering state: its chunk-level decay is 0.
        chunk_keep = keep.amin(dim=0) if keep is not None else None
        states = _scan(delta.sum(dim=0), A, local_end, h0, chunk_keep)  # (nc, *rows, dstate)
        h = torch.cat([h0[None], states[:-1]], dim=0)
    else:
        h = h0[None].clone()

    # Pass 2: every chunk from its entering state, reading out what the caller wants. The
    # readout sum_n C * h is a batched vector-matrix product: one pass over h, no temporary.
    outs, gathered = [], []
    Cs = C.unbind(0) if C is not None else None
    for j in range(chunk):
        h = torch.addcmul(xs[j], decays[j], h, out=h if in_place else None)
        outs.append(torch.matmul(Cs[j], h).squeeze(-2) if Cs is not None else h)
        if ends is not None and j in ends:
            gathered.append(h.index_select(0, ends[j]))
    return torch.stack(outs, dim=0), h[-1], gathered


def _scan(
    delta: torch.Tensor, A: torch.Tensor, x: torch.Tensor, h0: torch.Tensor, keep: torch.Tensor | None
) -> torch.Tensor:
    """States of h_t = exp(delta_t * A) * keep_t * h_{t-1} + x_t for every t (chunk summaries).

    delta: (L, *rows, 1, channels)   A: (dstate, channels)   x: (L, *rows, dstate, channels)
    h0: (*rows, dstate, channels)   keep: (L,) or None.   Returns h: (L, *rows, dstate, channels).
    """
    length = delta.shape[0]
    # About sqrt(L) positions per chunk balances the two passes against the level below; short
    # sequences of summaries are stepped through directly (one chunk), as another level's fixed
    # costs would exceed the steps it saves.
    chunk = length if length <= 16 else math.ceil(length**0.5)
    keep_chunks = _to_chunks(keep, chunk, pad_value=1.0) if keep is not None else None
    states, _, _ = _scan_chunks(_to_chunks(delta, chunk), A, _to_chunks(x, chunk), h0, keep_chunks, None)
    return _from_chunks(states, length)


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
    chunk_size: int = _CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba-1 selective scan by the chunked two-pass method (no loop over time steps).

    u, delta: (batch, dim, seqlen)       A: (dim, dstate)
    B, C: (batch, ngroups, dstate, seqlen); channel d reads group d // (dim // ngroups)
    D, delta_bias: (dim,)                z: (batch, dim, seqlen)
    initial_state: (batch, dim, dstate), or (num_seqs, dim, dstate) with cu_seqlens
    cu_seqlens: (num_seqs + 1,) integer boundaries of packed sequences (then batch == 1)
    chunk_size: positions per chunk at the top level, a speed knob (results change only by rounding)

    Same semantics, arguments and results as
    :func:`ssmkit.ops.selective_scan.reference.selective_scan_reference`: out (batch, dim, seqlen)
    in the dtype of u; last_state (batch, dim, dstate), or (num_seqs, dim, dstate) with cu_seqlens,
    in the compute dtype (fp32, or fp64 for fp64 inputs), when return_last_state, else None.
    Arguments are assumed valid (the public function checks them).
    """
    compute = compute_dtype(u.dtype)
    batch, dim, seqlen = u.shape
    ngroups, dstate = B.shape[1], B.shape[2]
    per_group = dim // ngroups

    u_c, delta_c, A_c = u.to(compute), delta.to(compute), A.to(compute)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)

    if cu_seqlens is not None:
        packed = _Packed(cu_seqlens, seqlen, max(1, min(chunk_size, seqlen)), compute)
        h0 = u_c.new_zeros(1, dim, dstate)  # each sequence's own initial state enters at its start
    else:
        packed = None
        h0 = initial_state.to(compute) if initial_state is not None else u_c.new_zeros(batch, dim, dstate)

    y = u_c.new_zeros(batch, dim, 0)
    last = h0
    gathered: list[torch.Tensor] = []
    if seqlen > 0:
        chunk = max(1, min(chunk_size, seqlen))
        delta_u = delta_c * u_c
        # B and C are small (no channel dimension): chunked once, (chunk, nc, batch, ngroups, dstate).
        B_chunks = _to_chunks(B.to(compute).permute(3, 0, 1, 2).contiguous(), chunk)
        C_chunks = _to_chunks(C.to(compute).permute(3, 0, 1, 2).contiguous(), chunk)

        tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        ws = None if needs_grad else _Workspace()
        floor = _needs_floor(delta_c, A_c)
        channels = max(1, min(per_group, _BLOCK_ELEMENTS // (dstate * seqlen)))
        rows = max(1, min(batch, _BLOCK_ELEMENTS // (channels * dstate * seqlen)))
        y_rows, last_rows = [], []
        for b0 in range(0, batch, rows):
            b1 = min(batch, b0 + rows)
            y_cols, last_cols, gathered_cols = [], [], []
            for g in range(ngroups):
                for d0 in range(g * per_group, (g + 1) * per_group, channels):
                    d1 = min((g + 1) * per_group, d0 + channels)
                    # (chunk, nc, rows, 1, channels): one step size per channel and position.
                    delta_blk = _block_to_chunks(delta_c[b0:b1, d0:d1], chunk)[..., None, :]
                    delta_u_blk = _block_to_chunks(delta_u[b0:b1, d0:d1], chunk)[..., None, :]
                    # x = delta * u * B: (chunk, nc, rows, dstate, channels).
                    x = _mul(delta_u_blk, B_chunks[:, :, b0:b1, g, :, None], ws, "x")
                    keep = ends = None
                    if packed is not None:
                        keep, ends = packed.keep, packed.ends
                        if initial_state is not None:
                            entering = initial_state[:, d0:d1].to(compute)
                            x = packed.inject(x, entering, delta_c[0, d0:d1], A_c[d0:d1])
                    y_blk, last_blk, gathered_blk = _scan_chunks(
                        delta_blk,
                        A_c[d0:d1].T.contiguous(),
                        x,
                        h0[b0:b1, d0:d1].transpose(-1, -2),
                        keep,
                        C_chunks[:, :, b0:b1, g, None, :],
                        ends,
                        ws,
                        floor,
                    )
                    y_cols.append(_block_from_chunks(y_blk, seqlen))
                    last_cols.append(last_blk.transpose(-1, -2))
                    gathered_cols.append([states.transpose(-1, -2) for states in gathered_blk])
            y_rows.append(torch.cat(y_cols, dim=1))
            last_rows.append(torch.cat(last_cols, dim=1))
            if packed is not None:  # a single row: join each offset's gathered states over channels
                gathered = [torch.cat(parts, dim=2) for parts in zip(*gathered_cols)]
        y = torch.cat(y_rows, dim=0)
        last = torch.cat(last_rows, dim=0)

    if D is not None:
        y = y + D.to(compute)[:, None] * u_c
    if z is not None:
        y = y * F.silu(z.to(compute))
    out = y.to(u.dtype)
    if not return_last_state:
        return out, None
    if packed is not None:
        return out, packed.last_states(gathered, initial_state, dim, dstate)
    return out, last


class _Packed:
    """Bookkeeping for packed sequences in the chunked layout (host-side, from cu_seqlens).

    keep: (chunk, nc), 0 at each non-empty sequence's first position (the state restarts there).
    ends: {j: chunk indices}: the last positions of the non-empty sequences, grouped by their
    offset j within the chunks, in the order that ``order`` lists their sequence indices.
    """

    def __init__(self, cu_seqlens: torch.Tensor, seqlen: int, chunk: int, compute: torch.dtype) -> None:
        device = cu_seqlens.device
        bounds = [int(v) for v in cu_seqlens.tolist()]
        self.num_seqs = len(bounds) - 1
        nonempty = [i for i in range(self.num_seqs) if bounds[i + 1] > bounds[i]]
        self.ids = torch.tensor(nonempty, dtype=torch.long, device=device)
        self.starts = torch.tensor([bounds[i] for i in nonempty], dtype=torch.long, device=device)
        self.nc = -(-seqlen // chunk)
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

    def inject(
        self, x: torch.Tensor, initial_state: torch.Tensor, delta: torch.Tensor, A: torch.Tensor
    ) -> torch.Tensor:
        """Add each sequence's decayed initial state to its first input: with the decay zeroed
        there, h_start = exp(delta * A) * h0_i + x_start, as if the sequence ran alone.

        x: (chunk, nc, 1, dstate, channels)   initial_state: (num_seqs, channels, dstate)
        delta: (channels, seqlen)   A: (channels, dstate).   Returns x with the same shape.
        """
        if self.starts.numel() == 0:
            return x
        decay = torch.exp(delta[:, self.starts].T[:, :, None] * A)  # (num_nonempty, channels, dstate)
        entering = (decay * initial_state[self.ids]).transpose(-1, -2)[:, None]
        positions = (self.starts % self.chunk) * self.nc + self.starts // self.chunk
        return x.flatten(0, 1).index_add(0, positions, entering).view_as(x)

    def last_states(
        self, gathered: list[torch.Tensor], initial_state: torch.Tensor | None, dim: int, dstate: int
    ) -> torch.Tensor:
        """(num_seqs, dim, dstate) from the states gathered at the sequences' last positions; an
        empty sequence never ran, so its last state is its initial state (or zero)."""
        if initial_state is not None:
            result = initial_state.to(self.compute)
        else:
            result = torch.zeros(self.num_seqs, dim, dstate, dtype=self.compute, device=self.ids.device)
        if not gathered:
            return result
        states = torch.cat(gathered, dim=0)[:, 0]  # (num_nonempty, dim, dstate), in self.order
        return result.index_copy(0, self.order, states.to(result.dtype))
