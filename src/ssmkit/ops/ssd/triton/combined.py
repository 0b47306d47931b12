"""The SSD forward and backward passes, composed from the stage launchers.

Forward: cumsum -> chunk states -> state passing -> CB -> chunk output.
Backward (recomputation; the forward keeps only the inputs, the per-chunk dt/cumsum (the size of
dt) and the states entering each chunk):
  1. recompute CB, and the output before the gate only when z needs it;
  2. gate: dy = dout * silu(z), dz, dD (elementwise, PyTorch);
  3. d(S_in_j) through the outputs of chunk j (chunk_state kernel, backward mode);
  4. state passing backward -> d(S_out_j), d(initial_states), d(cs_last);
  5. dx and x . d(x-path) per position (chunk_scan_bwd);
  6. dCB, summed over the heads of a group, and the quadratic part of d(cs) (bmm_bwd);
  7. dB, dC from dCB and the states, and the state part of d(cs) (chunk_state_bwd);
  8. d(cs) -> d(dt), dA through the cumsum, clamp and softplus (cumsum backward).
"""

from __future__ import annotations

import torch

from ssmkit.ops.ssd.triton.bmm import bmm_chunk
from ssmkit.ops.ssd.triton.bmm_bwd import bmm_chunk_bwd
from ssmkit.ops.ssd.triton.chunk_scan import chunk_scan
from ssmkit.ops.ssd.triton.chunk_scan_bwd import chunk_scan_bwd_dx
from ssmkit.ops.ssd.triton.chunk_state import chunk_state
from ssmkit.ops.ssd.triton.chunk_state_bwd import chunk_state_bwd_db_dc
from ssmkit.ops.ssd.triton.config import STAGES, tiles_for
from ssmkit.ops.ssd.triton.cumsum import chunk_cumsum_bwd, chunk_cumsum_fwd
from ssmkit.ops.ssd.triton.state_passing import state_passing_bwd, state_passing_fwd
from ssmkit.ops.ssd.triton.varlen import chunk_table


def ssd_forward(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shapes as in :func:`ssmkit.ops.ssd.triton.ssd_triton`; x, B, C, z fp32/fp16/bf16 (any strides).
    Returns (out like x, final states (batch, nheads, headdim, dstate) fp32, varlen states
    (num_seqs, nheads, headdim, dstate) fp32 or None, states entering each chunk (batch, nchunks,
    nheads, headdim, dstate) fp32, processed dt and cumsum (batch, nheads, nchunks, chunk_size) fp32)."""
    seqlen = x.shape[1]
    table = chunk_table(seqlen, chunk_size, cu_seqlens, x.device)
    tiles = {stage: tiles_for(x.device, chunk_size, stage) for stage in ("chunk_state", "bmm", "chunk_scan")}
    num_seqs = cu_seqlens.numel() - 1 if cu_seqlens is not None else 0
    if initial_states is not None:
        initial_states = initial_states.contiguous()
    dt_out, cs = chunk_cumsum_fwd(dt, A, dt_bias, table, chunk_size, dt_softplus, dt_limit)
    states = chunk_state(x, B, dt_out, cs, seq_idx, table, chunk_size, tiles["chunk_state"], forward=True)
    states, final, varlen = state_passing_fwd(
        states, cs, initial_states, seq_idx, table, chunk_size, num_seqs
    )
    cb = bmm_chunk(C, B, table, chunk_size, tiles["bmm"])
    if varlen is not None:
        # An empty packed sequence takes no step: its state is the one it started from.
        start = initial_states.float() if initial_states is not None else torch.zeros_like(varlen)
        varlen = torch.where(table.empty[:, None, None, None], start, varlen)
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    chunk_scan(cb, x, dt_out, cs, C, states, D, z, seq_idx, table, chunk_size, tiles["chunk_scan"], out)
    return out, final, varlen, states, dt_out, cs


def ssd_backward(
    dout: torch.Tensor,
    dfinal: torch.Tensor | None,
    dvarlen: torch.Tensor | None,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    initial_states: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    states: torch.Tensor,
    dt_out: torch.Tensor,
    cs: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """dout: like x; dfinal: None or like the final states; dvarlen: None or like the varlen states;
    states, dt_out, cs: as returned by :func:`ssd_forward`.
    Returns gradients (dx in x's dtype, the others fp32: ddt, dA, dB, dC, dD or None, dz or None,
    ddt_bias or None, dinitial_states or None), each shaped like its input."""
    batch, seqlen, nheads, headdim = x.shape
    table = chunk_table(seqlen, chunk_size, cu_seqlens, x.device)
    tiles = {stage: tiles_for(x.device, chunk_size, stage) for stage in STAGES}

    # 1. Recompute what the forward did not keep: CB, and the output before the gate when the
    # gate's gradient needs it.
    cb = bmm_chunk(C, B, table, chunk_size, tiles["bmm"])

    # 2. The gate and the skip connection are elementwise. dy is kept in the input dtype for half
    # precision inputs (the kernels feed it to tl.dot in that dtype anyway; fp32 would double the
    # bytes every backward stage reads), in fp32 otherwise.
    dy_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    dz = None
    if z is not None:
        y_pre = torch.empty(x.shape, device=x.device, dtype=torch.float32)
        chunk_scan(
            cb, x, dt_out, cs, C, states, D, None, seq_idx, table, chunk_size, tiles["chunk_scan"], y_pre
        )
        dout_f = dout.float()
        z_f = z.float()
        sig = torch.sigmoid(z_f)
        dy_f = dout_f * z_f * sig
        dz = dout_f * y_pre * sig * (1 + z_f * (1 - sig))
        del y_pre, dout_f, z_f, sig
    else:
        dy_f = dout
    dy = dy_f.to(dy_dtype).contiguous()
    del dy_f

    # 3-4. Gradients of the chunk states, walked backwards through the state passing.
    dstates = chunk_state(dy, C, dt_out, cs, seq_idx, table, chunk_size, tiles["chunk_state"], forward=False)
    init_shape = tuple(initial_states.shape) if initial_states is not None else None
    dstates, dinit, dlast = state_passing_bwd(
        dstates, states, cs, seq_idx, table, chunk_size, dfinal, dvarlen, init_shape
    )
    if dinit is not None and dvarlen is not None and table.varlen:
        dinit = dinit + torch.where(table.empty[:, None, None, None], dvarlen.float(), 0.0)

    # 5. dx, the dt gradient of the x-path, and dD (summed inside the same kernel).
    dx, ddt_chunk, ddt_state, dD = chunk_scan_bwd_dx(
        cb, x, dy, dt_out, cs, B, dstates, D, seq_idx, table, chunk_size, tiles["chunk_scan_bwd"]
    )

    # 6-7. dB and dC, summed over the heads that share a group, and d(cs) of the chunk outputs.
    dcb, dcs_quadratic = bmm_chunk_bwd(x, dy, dt_out, cs, cb, seq_idx, table, chunk_size, tiles["bmm_bwd"])
    del cb
    dB, dC, dcs_states = chunk_state_bwd_db_dc(
        x, dy, dt_out, cs, B, C, states, dstates, dcb, seq_idx, table, chunk_size, tiles["chunk_state_bwd"]
    )

    # 8. Through the cumulative sum and the dt processing.
    ddt, dA = chunk_cumsum_bwd(
        dt,
        A,
        dt_bias,
        table,
        chunk_size,
        dt_softplus,
        dt_limit,
        dt_out,
        dcs_quadratic + dcs_states,
        ddt_chunk,
        ddt_state,
        dlast,
    )
    ddt_bias = ddt.sum(dim=(0, 1)) if dt_bias is not None else None
    return dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit
