"""Batches from a token stream: fixed windows, packed with ``cu_seqlens``, in a deterministic and
resumable order that does not depend on the number of processes.

The stream is cut into non-overlapping windows of ``seq_len`` tokens. Each epoch visits the windows
in a permutation drawn from ``(seed, epoch)``; a global batch is the next ``world_size *
grad_accum * micro_batch_size`` windows of that order, so the data a step sees is a function of the
step's position alone, whatever the world size. The position (a count of global batches) is all the
state there is: saving it and restoring it resumes the exact order.

With ``packing`` a micro-batch is one row of ``micro_batch_size * seq_len`` tokens and
``cu_seqlens`` marks every window edge and every document end (the token after each end-of-text
id), so the model never attends or carries state across documents and no token is padding.
Without packing it is ``(micro_batch_size, seq_len)`` rows that run through document ends.

``sampling="random"`` draws every window's first token uniformly from the whole stream instead
(with replacement, as nanoGPT samples): a small corpus then shows the model windows that start
anywhere, not the same few thousand cuts every epoch, which a model can memorise. The draws of a
global batch come from ``(seed, batch number)``, so the order is as resumable and as independent of
the number of processes as the fixed windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ssmkit.data.tokens import TokenStream


@dataclass
class Batch:
    """input_ids, labels: (rows, seqlen) int64 (labels are shifted inside the model);
    cu_seqlens: (num_seqs + 1,) int32 when packed (rows == 1), else None;
    num_targets: how many next-token targets the model's mean loss averages over."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor | None
    num_targets: int

    def to(self, device: torch.device | str) -> Batch:
        cu = None if self.cu_seqlens is None else self.cu_seqlens.to(device, non_blocking=True)
        return Batch(
            self.input_ids.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            cu,
            self.num_targets,
        )

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def pack_windows(windows: np.ndarray, eos_id: int | None) -> Batch:
    """One packed row from ``windows``: (count, seq_len) token ids.

    cu_seqlens has a boundary at every window edge and after every end-of-text token; a window that
    ends with end-of-text gets no empty segment."""
    count, seq_len = windows.shape
    flat = torch.from_numpy(np.asarray(windows, dtype=np.int64).reshape(-1))
    edges = set(range(0, count * seq_len + 1, seq_len))
    if eos_id is not None:
        ends = np.nonzero(np.asarray(windows).reshape(-1) == eos_id)[0] + 1
        edges.update(int(e) for e in ends)
    cu_seqlens = torch.tensor(sorted(edges), dtype=torch.int32)
    num_targets = count * seq_len - (cu_seqlens.numel() - 1)
    return Batch(flat[None], flat[None].clone(), cu_seqlens, num_targets)


def stack_windows(windows: np.ndarray) -> Batch:
    """Unpacked rows: windows (count, seq_len) -> input_ids (count, seq_len)."""
    rows = torch.from_numpy(np.asarray(windows, dtype=np.int64))
    count, seq_len = rows.shape
    return Batch(rows, rows.clone(), None, count * (seq_len - 1))


class WindowLoader:
    """Global batches of windows from ``stream`` for one rank (see the module docstring).

    ``next_step()`` returns this rank's ``grad_accum`` micro-batches of the next global batch and
    advances the position; ``state_dict()``/``load_state_dict()`` save and restore the position.
    """

    def __init__(
        self,
        stream: TokenStream,
        *,
        seq_len: int,
        micro_batch_size: int,
        grad_accum: int = 1,
        packing: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        sampling: str = "windows",
    ) -> None:
        if sampling not in ("windows", "random"):
            raise ValueError(f"sampling must be 'windows' or 'random', got {sampling!r}")
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (one input and one target), got {seq_len}")
        if micro_batch_size < 1 or grad_accum < 1:
            raise ValueError(
                f"micro_batch_size and grad_accum must be >= 1, got {micro_batch_size} and {grad_accum}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.stream = stream
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.packing = packing
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.sampling = sampling
        self.num_windows = len(stream) // seq_len
        if self.num_windows == 0:
            raise ValueError(
                f"the token stream ({len(stream)} tokens) is shorter than one window of {seq_len}"
            )
        self.position = 0  # global batches consumed
        self._order_epoch = -1
        self._random_batch = -1  # the global batch whose random starts _random_draws holds
        self._random_draws = np.empty(0, dtype=np.int64)
        self._order = np.arange(self.num_windows)

    @property
    def windows_per_step(self) -> int:
        return self.world_size * self.grad_accum * self.micro_batch_size

    @property
    def tokens_per_step(self) -> int:
        return self.windows_per_step * self.seq_len

    def _window_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
                self._order = rng.permutation(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def _windows(self, first: int, count: int) -> np.ndarray:
        """Token windows (count, seq_len) for global sample indices [first, first + count)."""
        if self.sampling == "random":
            starts = self._random_starts(first, count)
        else:
            starts = np.empty(count, dtype=np.int64)
            for i in range(count):
                epoch, offset = divmod(first + i, self.num_windows)
                starts[i] = self._window_order(epoch)[offset] * self.seq_len
        tokens = self.stream.tokens
        return np.stack([np.asarray(tokens[s : s + self.seq_len]) for s in starts])

    def _random_starts(self, first: int, count: int) -> np.ndarray:
        """Uniform window starts for global samples [first, first + count): each global batch's
        draws come from (seed, batch number) alone, whatever rank or micro-batch asks."""
        per_batch = self.windows_per_step
        high = len(self.stream) - self.seq_len + 1
        starts = np.empty(count, dtype=np.int64)
        for i in range(count):
            batch, slot = divmod(first + i, per_batch)
            if batch != self._random_batch:
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 1, batch])))
                self._random_draws = rng.integers(0, high, size=per_batch)
                self._random_batch = batch
            starts[i] = self._random_draws[slot]
        return starts

    def batches_at(self, position: int) -> list[Batch]:
        """This rank's micro-batches of global batch number ``position`` (does not move)."""
        first = position * self.windows_per_step
        out = []
        for micro in range(self.grad_accum):
            # Micro-batch m of rank r: the (m * world_size + r)-th slice of the global batch.
            slot = micro * self.world_size + self.rank
            windows = self._windows(first + slot * self.micro_batch_size, self.micro_batch_size)
            out.append(pack_windows(windows, self.stream.eos_id) if self.packing else stack_windows(windows))
        return out

    def next_step(self) -> list[Batch]:
        batches = self.batches_at(self.position)
        self.position += 1
        return batches

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "sampling": self.sampling,
            "windows_per_step": self.windows_per_step,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["seq_len"] != self.seq_len:
            raise ValueError(
                f"data order differs from the saved one: seed {state['seed']} -> {self.seed}, "
                f"seq_len {state['seq_len']} -> {self.seq_len}"
            )
        saved_sampling = state.get("sampling", "windows")  # checkpoints from before the option
        if saved_sampling != self.sampling:
            raise ValueError(f"data sampling differs from the saved one: {saved_sampling} -> {self.sampling}")
        if state["windows_per_step"] != self.windows_per_step:
            raise ValueError(
                f"the global batch differs from the saved one ({state['windows_per_step']} windows per step, "
                f"now {self.windows_per_step}); keep world_size * grad_accum * micro_batch_size fixed "
                "to resume"
            )
        self.position = int(state["position"])


def evaluation_batches(
    stream: TokenStream,
    *,
    seq_len: int,
    micro_batch_size: int,
    max_batches: int,
    packing: bool,
    rank: int = 0,
    world_size: int = 1,
) -> list[Batch]:
    """The first ``max_batches * world_size`` micro-batches of ``stream`` in order, this rank's share
    (every world_size-th one): a fixed validation set for the whole run."""
    loader = WindowLoader(
        stream, seq_len=seq_len, micro_batch_size=micro_batch_size, packing=packing, shuffle=False
    )
    total = min(max_batches * world_size, loader.num_windows // micro_batch_size)
    return [loader.batches_at(i)[0] for i in range(rank, total, world_size)]
