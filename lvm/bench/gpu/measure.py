"""Measuring one program on the device, and the small facts about the device the report needs."""

from __future__ import annotations

import re
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from lvm.bench import common


def measure(fn, args, *, reps: int, timing_s: float) -> tuple[dict[str, Any], Any]:
    """Compile `fn` for `args`, call it once (warm-up, kept), then time up to `reps` calls (>= 2, fewer once
    `timing_s` seconds are spent). Returns (timings with the median as `time_s`, the warm-up output)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    warmup_s = time.perf_counter() - t0
    times: list[float] = []
    while len(times) < max(reps, 2) and (len(times) < 2 or sum(times) < timing_s):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    row = {"compile_s": compile_s, "warmup_s": warmup_s, "times_s": times, "time_s": statistics.median(times)}
    row["memory"] = common.memory_stats(compiled)
    return row, out


def max_rel_err(got, ref) -> float:
    """max |got - ref| / max |ref| (the tests' measure), computed on the device."""
    got, ref = got.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))


def card_slug(device_kind: str) -> str:
    """Folder name of a device kind: "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA H200" -> "h200", "cpu" -> "cpu"."""
    words = re.findall(r"[a-z0-9]+", device_kind.lower())
    for word in words:
        if re.fullmatch(r"[a-z]+\d+[a-z]*", word):
            return word
    return "-".join(words) or "unknown"


def device_memory_limit() -> int | None:
    """Bytes the allocator of device 0 may hand out (None where the backend does not say, e.g. CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def error_text(err: BaseException) -> str:
    """An exception as one row's "error": its type and message, cut to 600 characters."""
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= 600 else text[:600] + " ..."
