"""Argument checks shared by the public operator functions.

Every check runs before any compute and raises with a message that names the argument, the
expected value and the received one, e.g.::

    ValueError: B must have shape (batch, seqlen, ngroups, dstate) = (2, 75, 1, 13), got (2, 75, 13)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)

Dim = tuple[str, "int | None"]


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(name: str, value: object, *, optional: bool = False) -> torch.Tensor | None:
    """Check that ``value`` is a tensor (or None when ``optional``)."""
    if value is None:
        if optional:
            return None
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def shape(name: str, value: torch.Tensor, dims: Sequence[Dim]) -> None:
    """Check rank and sizes. ``dims`` is ``[(label, size or None), ...]``; None accepts any size."""
    got = value.shape
    if len(got) == len(dims) and all(size is None or g == size for g, (_, size) in zip(got, dims)):
        return  # the common case stays cheap: decode steps call this per argument per token
    got = tuple(got)
    labels = ", ".join(label for label, _ in dims)
    expected = tuple("?" if size is None else size for _, size in dims)
    shown = "(" + ", ".join(str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"
    raise ValueError(f"{name} must have shape ({labels}) = {shown}, got {got}")


def floating(name: str, value: torch.Tensor, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must have a floating dtype ({_dtype_names(dtypes)}), got {value.dtype}")


def integer(name: str, value: torch.Tensor, dtypes: Sequence[torch.dtype] = INDEX_DTYPES) -> None:
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must have an integer dtype ({_dtype_names(dtypes)}), got {value.dtype}")


def same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Check that every tensor in ``others`` lives on the device of ``reference``."""
    for name, value in others.items():
        if value is not None and value.device != reference.device:
            raise ValueError(
                f"{name} must be on the same device as {reference_name} ({reference.device}), "
                f"got {value.device}"
            )


def same_dtype(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, value in others.items():
        if value is not None and value.dtype != reference.dtype:
            raise TypeError(
                f"{name} must have the dtype of {reference_name} ({reference.dtype}), got {value.dtype}"
            )


def divisible(name: str, value: int, by_name: str, by: int) -> None:
    if by <= 0 or value % by != 0:
        raise ValueError(f"{name} ({value}) must be divisible by {by_name} ({by})")


def cu_seqlens(name: str, value: torch.Tensor, total_length: int, batch: int) -> None:
    """Check packed-sequence boundaries: int (num_seqs + 1,), starting at 0, non-decreasing,
    ending at ``total_length``; packed batches have batch size 1."""
    integer(name, value)
    if value.dim() != 1 or value.numel() < 2:
        raise ValueError(
            f"{name} must have shape (num_seqs + 1,) with num_seqs >= 1, got {tuple(value.shape)}"
        )
    if batch != 1:
        raise ValueError(f"packed sequences ({name} given) need batch size 1, got batch {batch}")
    first, last = int(value[0]), int(value[-1])
    if first != 0 or last != total_length:
        raise ValueError(f"{name} must start at 0 and end at seqlen ({total_length}), got {first} .. {last}")
    if bool((value[1:] < value[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing, got {value.tolist()}")
