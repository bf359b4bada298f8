"""Time budgets: each section gets its seconds plus what earlier ones left, and skips (with a note) what does
not fit, so the whole check ends before the script's hard time limit."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from lvm.bench.gpu import STARTED


@dataclasses.dataclass
class Section:
    """One section's time budget and what it skipped."""

    name: str
    budget_s: float
    start: float = dataclasses.field(default_factory=lambda: time.perf_counter())
    notes: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def allows(self, estimate_s: float, what: str) -> bool:
        """Whether `what` (estimated at `estimate_s`) fits the time left; if not, a note says it was skipped."""
        if estimate_s <= self.left():
            return True
        self.notes.append(
            f"skipped {what}: needs about {estimate_s:.0f} s, {max(self.left(), 0):.0f} s left of the "
            f"{self.name} budget"
        )
        print(f"  {self.notes[-1]}", flush=True)
        return False

    def record(self) -> dict[str, Any]:
        return {
            "budget_s": round(self.budget_s, 1),
            "used_s": round(time.perf_counter() - self.start, 1),
            "notes": self.notes,
            "error": self.error,
        }


class Budget:
    """Sections get their nominal seconds plus what earlier ones left unused (minus what they overran), never
    past the run's deadline."""

    def __init__(self, nominal: dict[str, float], deadline_s: float, started: float = STARTED):
        self.nominal = dict(nominal)
        self.deadline = started + deadline_s
        self.carry = 0.0

    def open(self, name: str) -> Section:
        seconds = min(self.nominal[name] + self.carry, self.deadline - time.perf_counter())
        return Section(name, max(seconds, 0.0))

    def close(self, section: Section) -> None:
        self.carry = section.left()
