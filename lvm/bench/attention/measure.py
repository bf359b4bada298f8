"""Measuring one attention setting: the project's (in this process) and the public reference's (a subprocess).

jax is imported inside the functions: `lvm bench` imports this module before the simulated CPU device count is
set, which must happen before jax starts.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import time
from typing import Any

from lvm.bench import common

REPO = pathlib.Path(__file__).resolve().parents[3]
REFERENCE_SCRIPT = REPO / "scripts" / "reference_ring_attention.py"
DEFAULT_REFERENCE_PYTHON = REPO / ".venv-ref" / "bin" / "python"


def measure_ours(case: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Compile and time forward+backward of the project's attention at one case (a row of `cases.cases`).

    What is timed is `jax.grad` of sum(attention(q, k, v) * w) with respect to q, k and v. Dense attention
    runs on one device; blockwise and ring attention run through `sharded_attention` on an sp-device mesh with
    q, k, v and w sharded along the sequence. Returns the measurement (`common.compile_and_measure`) and, for the
    sharded ones, the per-step kernel and tile sizes actually used.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lvm.attention import dense_attention, sharded_attention
    from lvm.attention.chunking import default_chunk, run_length
    from lvm.attention.ring import choose_kernel, mesh_platform

    s, sp, causal = case["seq_len"], case["sp"], case["causal"]
    dtype = jnp.dtype(settings["dtype"])
    shape = (settings["batch"], s, settings["heads"], settings["head_dim"])
    keys = jax.random.split(jax.random.key(0), 4)
    chosen: dict[str, Any] = {}
    if case["impl"] == "dense":

        def attention(q, k, v):
            return dense_attention(q, k, v, causal=causal)

        place = lambda x: x
    else:
        layout = "contiguous" if case["layout"] == "-" else case["layout"]
        mesh = jax.make_mesh(
            (sp,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:sp]
        )
        chunk = None
        if settings["chunk"]:
            chunk = default_chunk(run_length(layout, s // sp, sp), settings["chunk"])
        kernel = settings.get("kernel", "auto")
        target, tiles, _ = choose_kernel(
            kernel, mesh_platform(mesh), s // sp, sp, layout, shape[3], chunk, chunk
        )
        chosen = {"kernel": "xla" if target is None else "fused", "q_chunk": tiles[0], "kv_chunk": tiles[1]}

        def attention(q, k, v):
            return sharded_attention(
                q, k, v, mesh, causal=causal, layout=layout, q_chunk=chunk, kv_chunk=chunk, kernel=kernel
            )

        sharding = NamedSharding(mesh, P(None, "sp", None, None))
        place = lambda x: jax.device_put(x, sharding)

    def loss(q, k, v, w):
        return jnp.sum(attention(q, k, v).astype(jnp.float32) * w)

    q, k, v = (place(jax.random.normal(kk, shape, dtype)) for kk in keys[:3])
    w = place(jax.random.normal(keys[3], shape, jnp.float32))
    grad = jax.grad(loss, argnums=(0, 1, 2))
    timing = common.compile_and_measure(
        grad, (q, k, v, w), reps=settings["reps"], budget_s=settings["budget_s"]
    )
    return {**chosen, **timing}


def run_reference(
    settings: dict[str, Any], python: str, n_devices: int, timeout_s: float = 3600
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run scripts/reference_ring_attention.py in the reference env at `settings`; returns (rows, info).

    The rows are the script's results (series "reference"); info holds the command, its wall time and, when
    the run failed, an "error" (then rows is empty).
    """
    sp_values = [sp for sp in settings["sp_values"] if sp <= n_devices]
    cmd = [
        python,
        str(REFERENCE_SCRIPT),
        "--seq-lens",
        *map(str, settings["seq_lens"]),
        "--sp",
        *map(str, sp_values),
        "--batch",
        str(settings["batch"]),
        "--heads",
        str(settings["heads"]),
        "--head-dim",
        str(settings["head_dim"]),
        "--dtype",
        settings["dtype"],
        "--reps",
        str(settings["reps"]),
        "--budget",
        str(settings["budget_s"]),
        "--max-chunk",
        str(settings["chunk"] or 512),
    ]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the script sets its own device count
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu") or "cpu"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return [], {"error": f"reference run timed out after {timeout_s:.0f} s", "command": cmd}
    info: dict[str, Any] = {"command": cmd, "wall_s": time.perf_counter() - t0, "returncode": proc.returncode}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        info["error"] = f"reference run failed (exit {proc.returncode}): {proc.stderr[-2000:]}"
        return [], info
    payload = json.loads(lines[-1])  # the script prints its results as the last line
    info["implementation"] = payload.get("implementation")
    info["machine"] = payload.get("machine")
    rows = payload.get("results", [])
    for row in rows:
        row["series"] = "reference"
    return rows, info


def derive(row: dict[str, Any], settings: dict[str, Any], matmul: dict[str, Any]) -> None:
    """Add model FLOPs, FLOP/s and the fractions of the matmul's FLOP/s (wall, CPU time) to a measured row."""
    flops = common.attention_flops(
        row["seq_len"], settings["heads"], settings["head_dim"], settings["batch"], row["causal"]
    )
    row["model_flops"] = flops
    if row.get("time_s"):
        row["flops_per_s"] = flops / row["time_s"]
        row["matmul_fraction"] = row["flops_per_s"] / matmul["flops_per_s"]
    if row.get("cpu_s") and matmul.get("flops_per_cpu_s"):
        row["flops_per_cpu_s"] = flops / row["cpu_s"]
        row["matmul_fraction_cpu"] = row["flops_per_cpu_s"] / matmul["flops_per_cpu_s"]
