"""Simulated CPU devices: the one place that sets XLA's host device count (standard library only).

XLA reads `--xla_force_host_platform_device_count` when jax initialises its CPU backend, so the count must be
set before jax is imported (in this process) or in the environment of a child process.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

FLAG = "--xla_force_host_platform_device_count"


def xla_flags(n: int, flags: str = "") -> str:
    """`flags` (an XLA_FLAGS value) with the host device count set to `n` (any earlier count removed)."""
    rest = re.sub(rf"{FLAG}=\d+", "", flags).split()
    return " ".join([*rest, f"{FLAG}={int(n)}"])


def cpu_env(n: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment for a child process that runs jax on `n` simulated CPU devices."""
    env = dict(os.environ if base is None else base)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = xla_flags(n, env.get("XLA_FLAGS", ""))
    return env


def requested() -> int | None:
    """The host device count XLA_FLAGS asks for (None when it names none)."""
    found = re.search(rf"{FLAG}=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(found.group(1)) if found else None


def simulate(n: int, *, cpu_only: bool = False, keep: bool = False) -> bool:
    """Ask for `n` simulated CPU devices in this process; False (nothing changed) once jax is imported.

    `cpu_only` also makes CPU jax's default platform (unless JAX_PLATFORMS is set); `keep` leaves a count the
    environment already asks for. The count only multiplies host CPU devices, so it is harmless on GPU/TPU.
    """
    if "jax" in sys.modules:
        return False
    if cpu_only:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if not (keep and requested() is not None):
        os.environ["XLA_FLAGS"] = xla_flags(n, os.environ.get("XLA_FLAGS", ""))
    return True
