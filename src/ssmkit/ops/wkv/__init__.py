"""RWKV-style WKV recurrence with a matrix-valued state per head (the RWKV-5 form).

For every head, with a positive per-head decay ``w`` (the state is multiplied by ``exp(-w)`` per
step) and a per-channel bonus ``u`` ("time_first") for the current token::

    y_t = r_t @ (S_{t-1} + (u * k_t)^T v_t)        r_t, k_t, u: (dk,)   v_t: (dv,)   y_t: (dv,)
    S_t = exp(-w) * S_{t-1} + k_t^T v_t            S: (dk, dv), S_{-1} = initial_state (or 0)

- :mod:`.reference` — the recurrence as a loop over time, the ground truth (fp64-capable).
- :mod:`.chunked` — the chunked matrix form in PyTorch (no loop over time steps), the fast path.
- :mod:`.interface` — :func:`wkv` (checks, dispatch) and :func:`wkv_step` (one decode step).

Not registered in :mod:`ssmkit.ops`; import it as ``ssmkit.ops.wkv``.
"""

from ssmkit.ops.wkv.interface import wkv, wkv_step

__all__ = ["wkv", "wkv_step"]
