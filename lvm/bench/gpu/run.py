"""One run of the check: its settings, the shared state of the model sections, and the results, written to
OUT/gpu_check.json and OUT/gpu_check.md after every measurement (a run cut short keeps what it measured)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any

import jax

from lvm.bench import common
from lvm.bench.gpu import STARTED
from lvm.bench.gpu.measure import device_memory_limit
from lvm.bench.gpu.report import NOTES, render_markdown
from lvm.bench.gpu.settings import Settings
from lvm.bench.gpu.targets import evaluate_targets

# The environment that decides the device's memory and compile caching, recorded with the machine.
ENV_KEYS = (
    "XLA_PYTHON_CLIENT_PREALLOCATE",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "XLA_FLAGS",
    "JAX_COMPILATION_CACHE_DIR",
)


class Run:
    def __init__(self, settings: Settings, out_dir: pathlib.Path, smoke: bool, memory_limit: int | None):
        self.settings = settings
        self.out_dir = out_dir
        self.smoke = smoke
        self.memory_limit = memory_limit
        self.backend = jax.default_backend()
        self.mesh1 = jax.make_mesh(
            (1,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1]
        )
        self.matmul_flops: float | None = None
        # parameters, optimizer state and compiled steps, shared by the model sections
        self.state: dict[str, Any] = {}
        self.payload: dict[str, Any] = {
            "benchmark": "gpu_check",
            "created": common.utc_now(),
            "smoke": smoke,
            "machine": {
                **common.machine_info(),
                "memory_limit_bytes": device_memory_limit(),
                "env": {k: os.environ.get(k) for k in ENV_KEYS},
                "environment": jax.print_environment_info(return_string=True),
            },
            "settings": dataclasses.asdict(settings),
            "matmul": None,
            "attention": [],
            "train": [],
            "max_context": None,
            "vqgan_encode": None,
            "targets": {},
            "sections": {},
            "notes": list(NOTES),
        }

    def save(self) -> None:
        p = self.payload
        p["targets"] = evaluate_targets(p["attention"], p["train"], self.settings)
        p["wall_s"] = round(time.perf_counter() - STARTED, 1)
        common.write_json(self.out_dir / "gpu_check.json", p)
        (self.out_dir / "gpu_check.md").write_text(render_markdown(p))
