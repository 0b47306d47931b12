"""Per-layer inference state: what a layer carries from one call to the next.

An SSM layer's state has a fixed size whatever the length (a conv window and the SSM state); an
attention layer keeps its keys and values. A cache (``ssmkit.models.cache``) holds one per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SSMState:
    """conv: (batch, conv_channels, d_conv - 1), the last inputs of the causal conv.
    ssm: (batch, d_inner, d_state) for Mamba-1 and S4, (batch, nheads, headdim, d_state) for Mamba-2.
    """

    conv: torch.Tensor | None
    ssm: torch.Tensor

    def reset(self) -> None:
        if self.conv is not None:
            self.conv.zero_()
        self.ssm.zero_()

    def store(self, *, conv: torch.Tensor | None = None, ssm: torch.Tensor | None = None) -> None:
        """Keep the final states of a call.

        Without autograd the buffers are written in place, so they keep their identity (what CUDA
        graphs and the cache rely on). While autograd records, the new tensors are bound instead: the
        old ones were saved for backward as initial states and an in-place write would corrupt them.
        """
        for name, value in (("conv", conv), ("ssm", ssm)):
            if value is None:
                continue
            current = getattr(self, name)
            if torch.is_grad_enabled() and (value.requires_grad or current.requires_grad):
                setattr(self, name, value)
            else:
                current.copy_(value)

    def nbytes(self) -> int:
        return self.ssm.numel() * self.ssm.element_size() + (
            0 if self.conv is None else self.conv.numel() * self.conv.element_size()
        )


def check_decode(hidden: torch.Tensor, state: object) -> None:
    """The input a ``decode=True`` call takes: one token, hidden (batch, 1, d_model), and a state."""
    if state is None:
        raise ValueError("decode=True needs the layer's state")
    if hidden.shape[1] != 1:
        raise ValueError(f"decode takes one token per call, got hidden of shape {tuple(hidden.shape)}")


def keep_final(
    result: torch.Tensor | tuple[torch.Tensor, torch.Tensor], state: SSMState | None, name: str
) -> torch.Tensor:
    """The output of an op called with ``return_final_states=state is not None``; when there is a
    state, the op's final state is stored in its field ``name`` ("conv" or "ssm")."""
    if state is None:
        return result
    out, final = result
    state.store(**{name: final})
    return out


@dataclass
class KVState:
    """key, value: (batch, num_kv_heads, length, head_dim); grows by concatenation."""

    key: torch.Tensor
    value: torch.Tensor

    @property
    def length(self) -> int:
        return self.key.shape[2]

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.key = torch.cat([self.key, key], dim=2)
        self.value = torch.cat([self.value, value], dim=2)
        return self.key, self.value

    def reset(self) -> None:
        self.key = self.key[:, :, :0]
        self.value = self.value[:, :, :0]

    def nbytes(self) -> int:
        return 2 * self.key.numel() * self.key.element_size()
