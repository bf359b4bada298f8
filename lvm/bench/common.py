"""Shared helpers for `lvm bench ...` and the GPU check (`lvm.bench.gpu`): simulated CPU devices, timing, compiled
memory, machine info, attention FLOPs, result rows and target verdicts, JSON, tables.

Nothing here imports jax at module level: `configure_cpu_devices` must run before jax is first imported, so a
benchmark module imports jax inside its `run`. The module needs only the standard library, numpy and jax (no
project code, no matplotlib at import time), so helper scripts running in other environments (the reference
ring attention's `.venv-ref`) can import it too and measure with exactly the same code.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def configure_cpu_devices(n: int) -> None:
    """Ask XLA's CPU backend for `n` simulated devices. Call before jax is imported.

    Harmless on GPU/TPU hosts (the flag only multiplies host CPU devices). When jax is already imported (for
    example inside pytest, whose conftest set its own count) the flag can no longer change anything: the
    benchmark then uses whatever devices exist and skips settings that need more.
    """
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\d+", "", flags).strip()
    os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={int(n)}".strip()


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: jax backend and devices, CPU, Python."""
    import jax

    devices = jax.devices()
    cpu_model = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = None
    return {
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "simulated_cpu_devices": jax.default_backend() == "cpu" and len(devices) > 1,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average_start": load_average(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on shared cores slows every timing."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def memory_stats(compiled) -> dict[str, int | None]:
    """Per-device sizes from XLA's compiled memory analysis (an SPMD program describes one device)."""
    stats = compiled.memory_analysis()
    if isinstance(stats, list | tuple):
        stats = stats[0]
    if stats is None:
        return {"temp_bytes": None, "argument_bytes": None, "output_bytes": None, "per_device_bytes": None}

    def get(name):
        value = getattr(stats, name, None)
        return None if value is None else int(value)

    out = {
        "temp_bytes": get("temp_size_in_bytes"),
        "argument_bytes": get("argument_size_in_bytes"),
        "output_bytes": get("output_size_in_bytes"),
        "alias_bytes": get("alias_size_in_bytes"),
        "peak_bytes": get("peak_memory_in_bytes"),
        "generated_code_bytes": get("generated_code_size_in_bytes"),
    }
    out["per_device_bytes"] = (out["temp_bytes"] or 0) + (out["argument_bytes"] or 0)
    return out


def block(x):
    import jax

    return jax.block_until_ready(x)


def time_calls(
    fn: Callable, args: Sequence, *, reps: int = 3, min_reps: int = 2, budget_s: float | None = None
) -> dict[str, Any]:
    """Wall time of `fn(*args)` (results waited for with block_until_ready) after one warm-up call.

    Runs `reps` timed calls, or stops after `min_reps` once `budget_s` seconds of timed calls are spent. The
    headline is the minimum: on shared cores, interference only ever adds time. The process CPU time of each
    call (all threads) is recorded too: it is much less sensitive to other work on the machine than wall time.
    """
    t0 = time.perf_counter()
    block(fn(*args))
    warmup = time.perf_counter() - t0
    times: list[float] = []
    cpu: list[float] = []
    for _ in range(max(reps, 1)):
        c0, t0 = time.process_time(), time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if budget_s is not None and len(times) >= min_reps and sum(times) >= budget_s:
            break
    return {
        "time_s": min(times),
        "time_median_s": statistics.median(times),
        "times_s": times,
        "cpu_s": min(cpu),
        "cpu_times_s": cpu,
        "warmup_s": warmup,
    }


def compile_and_measure(
    fn: Callable, args: Sequence, *, reps: int = 3, min_reps: int = 2, budget_s: float | None = None
) -> dict[str, Any]:
    """jit-compile `fn` for `args`, read its per-device memory analysis, then time it."""
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    result = {"compile_s": compile_s, "memory": memory_stats(compiled)}
    result.update(time_calls(compiled, args, reps=reps, min_reps=min_reps, budget_s=budget_s))
    return result


def matmul_throughput(n: int = 4096, dtype: str = "float32", reps: int = 3) -> dict[str, Any]:
    """FLOP/s of one plain [n, n] x [n, n] matmul on the default device: the yardstick for kernel efficiency.

    Also FLOPs per second of process CPU time (all threads), a yardstick that other work on the machine barely
    moves.
    """
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    timing = compile_and_measure(lambda x, y: x @ y, (a, b), reps=reps)
    flops = 2.0 * n**3
    return {
        "n": n,
        "dtype": str(jnp.dtype(dtype)),
        "flops": flops,
        "time_s": timing["time_s"],
        "times_s": timing["times_s"],
        "cpu_s": timing["cpu_s"],
        "flops_per_s": flops / timing["time_s"],
        "flops_per_cpu_s": flops / timing["cpu_s"] if timing["cpu_s"] > 0 else None,
        "measured_at": utc_now(),
    }


def attention_flops(seq_len: int, heads: int, head_dim: int, batch: int, causal: bool) -> float:
    """Model FLOPs of attention forward+backward: forward 4 S^2 D H per batch row, backward 2x forward, so
    3 x (4 S^2 D H); halved when causal (the masked half is not counted, whatever a kernel computes)."""
    forward = 4.0 * seq_len**2 * head_dim * heads * batch
    return 3.0 * forward * (0.5 if causal else 1.0)


def find_row(rows: Sequence[dict[str, Any]], **match) -> dict[str, Any] | None:
    """The first row with every `match` key equal and a measured time (`time_s`), else None."""
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()) and row.get("time_s"):
            return row
    return None


def verdict(
    items: Sequence[Any],
    passes: Callable[[Any], bool],
    describe: Callable[[Any], str],
    *,
    need: str,
    missing: str,
) -> dict[str, Any]:
    """A target's verdict over its measured checks: {"met": ..., "reason": ...}.

    met is None (not measured, reason `missing`) without items, else whether every item passes; the reason
    names the failing items, or all of them when none fails, as `describe` writes them, after what is needed
    (`need`): "fails (needs <= 0.6): sp=8: 0.71".
    """
    if not items:
        return {"met": None, "reason": missing}
    failing = [item for item in items if not passes(item)]
    shown = failing or items
    return {
        "met": not failing,
        "reason": f"{'fails' if failing else 'passes'} (needs {need}): " + "; ".join(map(describe, shown)),
    }


def fmt_met(met: bool | None) -> str:
    """A verdict in a table: yes, NO, or n/a when it could not be measured."""
    return "n/a" if met is None else ("yes" if met else "NO")


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy / jax scalars
        return obj.item()
    if isinstance(obj, pathlib.Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj):
    """JSON has no inf/nan: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> pathlib.Path:
    """Write `payload` as indented JSON (creating parent folders); returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(payload), indent=2, default=_json_default) + "\n")
    return path


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_seconds(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_looks_numeric(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def line(values):
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "| " + " | ".join(parts) + " |"

    sep = "|" + "|".join(
        ("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True)
    )
    return "\n".join([line(headers), sep + "|", *(line(r) for r in cells)])


def _looks_numeric(text: str) -> bool:
    return (
        bool(re.fullmatch(r"[-+]?[\d.,]+(e[-+]?\d+)?( ?[%x]| ?\w{0,3})?", text.strip()))
        or text.strip() == "-"
    )
