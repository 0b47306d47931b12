"""Temporary overrides of kernel launch configurations, for benchmark sweeps.

The Triton launchers read their block sizes from per-GPU tables (no autotuning, so the first call
does not stall). To compare alternatives, a sweep overrides fields of one stage's configuration
inside a ``with`` block; outside it the tables apply unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

Config = TypeVar("Config")


class ConfigOverrides:
    """Field overrides per stage name; ``stages`` lists the names accepted."""

    def __init__(self, stages: Iterable[str]) -> None:
        self.stages = tuple(stages)
        self._fields: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def forced(self, stage: str, **fields: Any) -> Iterator[None]:
        """Override ``fields`` of ``stage``'s configuration inside the block (nested blocks merge).
        For sweeps: a combination a kernel cannot compile fails at launch, it is not checked here."""
        if stage not in self.stages:
            raise ValueError(f"stage must be one of {self.stages}, got {stage!r}")
        previous = self._fields.get(stage)
        self._fields[stage] = {**(previous or {}), **fields}
        try:
            yield
        finally:
            if previous is None:
                self._fields.pop(stage, None)
            else:
                self._fields[stage] = previous

    def fields(self, stage: str) -> dict[str, Any]:
        """The fields currently overridden for ``stage`` (a copy)."""
        return dict(self._fields.get(stage, {}))

    def apply(self, stage: str, config: Config) -> Config:
        """``config`` (a dataclass) with ``stage``'s overrides replaced in."""
        fields = self._fields.get(stage)
        return dataclasses.replace(config, **fields) if fields else config
