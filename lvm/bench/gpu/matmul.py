"""Section matmul: bf16 [n, n] x [n, n] FLOP/s, the yardstick the other sections' FLOP/s are compared with."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from lvm.bench.gpu.measure import measure

if TYPE_CHECKING:
    from lvm.bench.gpu.budget import Section
    from lvm.bench.gpu.run import Run


def run_matmul(run: Run, section: Section) -> None:
    s = run.settings
    n = s.matmul_n
    ka, kb = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (n, n), jnp.dtype(s.dtype)) for k in (ka, kb))
    row, _ = measure(lambda x, y: x @ y, (a, b), reps=max(s.reps, 5), timing_s=s.case_timing_s)
    row.update(n=n, dtype=s.dtype, flops=2.0 * n**3, flops_per_s=2.0 * n**3 / row["time_s"])
    run.matmul_flops = row["flops_per_s"]
    run.payload["matmul"] = row
    print(f"  matmul {n}^3 {s.dtype}: {row['flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
