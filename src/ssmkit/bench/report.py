"""Benchmark results: one row per (operator, size, implementation), printed as a table and saved
as JSON with the environment that produced them."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Row:
    op: str
    size: str
    impl: str
    seconds: float | None  # median; None when the implementation could not run (see note)
    rounds: list[float] = field(default_factory=list)
    tokens: int = 0
    ratio: float | None = None  # peer-or-baseline time / our time (>1: ours is faster)
    ratio_to: str | None = None
    target: str | None = None  # e.g. ">= 2x"; met is judged on ratio
    met: bool | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds and self.tokens else None


def environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def write_json(path: str | Path, rows: list[Row], meta: dict | None = None) -> None:
    """Write rows + environment atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), **(meta or {}), "rows": [asdict(r) for r in rows]}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _fmt_rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if rate >= scale:
            return f"{rate / scale:.2f}{unit}"
    return f"{rate:.0f}"


def print_table(rows: list[Row], title: str, extra_columns: tuple[str, ...] = ()) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("op", "size", "impl", "time", "tokens/s", *extra_columns, "ratio", "target", "note"):
        table.add_column(column, overflow="fold")
    for row in rows:
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x vs {row.ratio_to}"
        target = row.target or ""
        if row.target and row.met is not None:
            target += " [green]met[/]" if row.met else " [red]MISSED[/]"
        extras = [str(row.extra.get(c, "")) for c in extra_columns]
        table.add_row(
            row.op,
            row.size,
            row.impl,
            _fmt_time(row.seconds),
            _fmt_rate(row.tokens_per_s),
            *extras,
            ratio,
            target,
            row.note,
        )
    Console().print(table)
