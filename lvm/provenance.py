"""What a run directory records about how it was made: commit, installed versions, devices."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import time
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parent.parent


def git_commit() -> dict:
    """The source tree's commit and whether it has uncommitted changes (None outside a git checkout)."""
    try:
        run = lambda *a: subprocess.run(
            ["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str]:
    """Installed distributions and versions (the environment made from requirements.lock)."""
    out = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out[name.lower()] = dist.version
    return dict(sorted(out.items()))


def run_record() -> dict:
    """A JSON-able record of this process's code, environment and devices."""
    devices = jax.devices()
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        **git_commit(),
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "processes": jax.process_count(),
        "packages": package_versions(),
    }
