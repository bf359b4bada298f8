"""Section attention: forward+backward of cuDNN's fused attention and of ours (kernels "fused" and "xla") at
each length, causal and full: time, FLOP/s, ratios to the matmul and to cuDNN, gradients against cuDNN's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from lvm.attention import sharded_attention
from lvm.attention.ring import choose_kernel
from lvm.bench import common
from lvm.bench.gpu.measure import error_text, max_rel_err, measure
from lvm.bench.gpu.report import tflops
from lvm.bench.gpu.settings import IMPLS, Settings

if TYPE_CHECKING:
    from lvm.bench.gpu.budget import Section
    from lvm.bench.gpu.run import Run


def attention_cases(s: Settings) -> list[dict[str, Any]]:
    """Run order: by length, causal before full, cuDNN (the reference) first; the xla kernel at the longest
    length (slowest by far) last of all."""
    cases = [dict(seq_len=n, causal=c, impl=i) for n in s.seq_lens for c in (True, False) for i in IMPLS]
    longest = max(s.seq_lens)
    return sorted(cases, key=lambda c: c["impl"] == "xla" and c["seq_len"] == longest)


def attention_fn(run: Run, impl: str, causal: bool):
    """loss(q, k, v, w) = sum(attention(q, k, v) * w) for one implementation; its gradient is what is timed."""
    if impl == "cudnn":
        implementation = "cudnn" if run.backend == "gpu" else None  # CPU: XLA's attention stands in

        def attention(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)

    else:
        chunk = run.settings.xla_chunk if impl == "xla" else None

        def attention(q, k, v):
            kw = dict(causal=causal, layout="contiguous", q_chunk=chunk, kv_chunk=chunk, kernel=impl)
            return sharded_attention(q, k, v, run.mesh1, **kw)

    def loss(q, k, v, w):
        return jnp.sum(attention(q, k, v).astype(jnp.float32) * w)

    return jax.grad(loss, argnums=(0, 1, 2))


def describe_impl(run: Run, impl: str, seq_len: int) -> dict[str, Any]:
    """What an implementation runs as: its name and, for ours, the kernel and its forward/backward tiles."""
    s = run.settings
    if impl == "cudnn":
        name = "jax.nn.dot_product_attention(implementation='cudnn')"
        return {"implementation": name if run.backend == "gpu" else "XLA attention (cuDNN stand-in off GPU)"}
    chunk = s.xla_chunk if impl == "xla" else None
    target, fwd, bwd = choose_kernel(impl, run.backend, seq_len, 1, "contiguous", s.head_dim, chunk, chunk)
    flavour = "xla" if target is None else f"{target.flavour}{' (interpret)' if target.interpret else ''}"
    return {
        "implementation": f"sharded_attention(kernel='{impl}'), 1-device mesh",
        "kernel": flavour,
        "tiles": {"forward": list(fwd), "backward": list(bwd)},
    }


def estimate_case_s(run: Run, case: dict[str, Any], flops: float) -> float:
    """Compile (the same implementation's slowest so far) + warm-up + 2 timed calls at the rate the same
    implementation reached at a shorter length (else a tenth of the matmul)."""
    done = [r for r in run.payload["attention"] if r["impl"] == case["impl"] and r.get("time_s")]
    compile_s = max((r["compile_s"] for r in done), default=run.settings.default_compile_s)
    same_mask = [r for r in done if r["causal"] == case["causal"]] or done
    rate = same_mask[-1]["flops_per_s"] if same_mask else 0.1 * (run.matmul_flops or 1e12)
    return 1.2 * compile_s + 3 * flops / rate


def run_attention(run: Run, section: Section) -> None:
    s = run.settings
    dtype = jnp.dtype(s.dtype)
    inputs: dict[int, tuple] = {}
    reference: dict[tuple[int, bool], Any] = {}  # (seq_len, causal) -> the reference gradients
    for case in attention_cases(s):
        n, causal, impl = case["seq_len"], case["causal"], case["impl"]
        row = {**case, "flops": common.attention_flops(n, s.heads, s.head_dim, 1, causal)}
        run.payload["attention"].append(row)
        what = f"{impl} S={n} {'causal' if causal else 'full'}"
        if not section.allows(estimate_case_s(run, case, row["flops"]), what):
            row["skipped"] = section.notes[-1]
            continue
        try:
            row.update(describe_impl(run, impl, n))
            if n not in inputs:  # one length's arrays at a time
                inputs = {n: _inputs(n, s.heads, s.head_dim, dtype)}
            timing, grads = measure(
                attention_fn(run, impl, causal), inputs[n], reps=s.reps, timing_s=s.case_timing_s
            )
            row.update(timing)
            row["flops_per_s"] = row["flops"] / row["time_s"]
            ref = reference.setdefault((n, causal), (impl, grads))
            if ref[0] != impl:
                row["grad_error_vs"] = ref[0]
                row["grad_max_rel_err"] = max(max_rel_err(g, r) for g, r in zip(grads, ref[1], strict=True))
            del grads
        except Exception as err:  # one failing case must not lose the others
            row["error"] = error_text(err)
        finally:
            reference = {k: v for k, v in reference.items() if k[0] == n}  # free other lengths' gradients
            _derive(run)
            run.save()
        _print(row)


def _inputs(n: int, heads: int, head_dim: int, dtype) -> tuple:
    """q, k, v of `dtype` and the float32 cotangent weights w, [1, n, heads, head_dim] each."""
    keys = jax.random.split(jax.random.key(n), 4)
    shape = (1, n, heads, head_dim)
    q, k, v = (jax.random.normal(key, shape, dtype) for key in keys[:3])
    return q, k, v, jax.random.normal(keys[3], shape, jnp.float32)


def _derive(run: Run) -> None:
    """Each timed row's FLOP/s as fractions of the matmul's and of cuDNN's at the same length and mask."""
    rows = run.payload["attention"]
    for row in rows:
        if not row.get("time_s"):
            continue
        if run.matmul_flops:
            row["of_matmul"] = row["flops_per_s"] / run.matmul_flops
        ref = common.find_row(rows, seq_len=row["seq_len"], causal=row["causal"], impl="cudnn")
        if ref:
            row["of_cudnn"] = row["flops_per_s"] / ref["flops_per_s"]


def _print(row) -> None:
    what = f"{row['impl']:<5} S={row['seq_len']:<6} {'causal' if row['causal'] else 'full  '}"
    if row.get("time_s"):
        err = f", grad err {row['grad_max_rel_err']:.1e}" if "grad_max_rel_err" in row else ""
        print(
            f"  {what} {common.fmt_seconds(row['time_s'])}, {tflops(row['flops_per_s'])} TFLOP/s "
            f"(compile {row['compile_s']:.1f} s{err})",
            flush=True,
        )
    elif row.get("error"):
        print(f"  {what} error: {row['error'][:200]}", flush=True)
