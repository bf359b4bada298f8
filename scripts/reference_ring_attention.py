"""Time the public reference ring attention (PyPI ringattention 0.1.2) forward+backward; print JSON on stdout.

Runs INSIDE `.venv-ref` (see scripts/setup_reference_env.sh), as a subprocess of `lvm bench attention`:

    .venv-ref/bin/python scripts/reference_ring_attention.py --seq-lens 1024 2048 --sp 1 2 4 8

It measures with the same helpers as the project's benchmark (`lvm/bench/common.py`, imported from this checkout
by path; it needs only jax and numpy). The reference is driven through its plain-JAX kernel (`ringattention_jax`,
what it selects on CPU) inside `shard_map` over a mesh axis `sp`, with contiguous sequence blocks (it has no
load-balanced layout), `causal_block_size=1` for causal attention and None otherwise, the settings LWM used
(`nothing_saveable` checkpoint policy, float32 logits). Progress goes to stderr; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", required=True)
    p.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--causal", choices=["both", "causal", "noncausal"], default="both")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-chunk", type=int, default=512, help="query/key chunk = min(max_chunk, seq / sp)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--budget", type=float, default=None, help="seconds of timed calls per setting (then stop)"
    )
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    from lvm.bench import common  # noqa: E402  (stdlib + jax only)

    common.configure_cpu_devices(args.devices)

    import jax
    import jax._src.xla_bridge as xla_bridge
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.lib.xla_bridge = xla_bridge  # ringattention 0.1.2 reads jax.lib.xla_bridge, removed in newer jax
    import ringattention
    from ringattention import ringattention_jax

    dtype = jnp.dtype(args.dtype)
    results = []
    causal_modes = {"both": (True, False), "causal": (True,), "noncausal": (False,)}[args.causal]
    for seq_len in args.seq_lens:
        for sp in args.sp:
            for causal in causal_modes:
                row = {
                    "impl": "reference",
                    "seq_len": seq_len,
                    "sp": sp,
                    "causal": causal,
                    "layout": "contiguous",
                }
                if sp > len(jax.devices()) or seq_len % sp:
                    row["error"] = f"needs {sp} devices and seq_len divisible by sp"
                    results.append(row)
                    continue
                chunk = min(args.max_chunk, seq_len // sp)
                row.update(q_chunk=chunk, kv_chunk=chunk)
                try:
                    row.update(
                        _measure(
                            jax,
                            jnp,
                            NamedSharding,
                            P,
                            ringattention_jax,
                            args,
                            seq_len,
                            sp,
                            causal,
                            chunk,
                            dtype,
                            common,
                        )
                    )
                except Exception as err:  # record and go on: one failing setting must not lose the others
                    row["error"] = f"{type(err).__name__}: {err}"
                    traceback.print_exc(file=sys.stderr)
                results.append(row)
                print(
                    f"reference S={seq_len} sp={sp} causal={causal}: "
                    + (row.get("error") or f"{row['time_s']:.3f}s"),
                    file=sys.stderr,
                    flush=True,
                )
    payload = {
        "implementation": "ringattention 0.1.2 (ringattention_jax, plain JAX blockwise ring)",
        "ringattention_file": getattr(ringattention, "__file__", None),
        "machine": common.machine_info(),
        "results": results,
    }
    print(json.dumps(payload, default=float))
    return 0


def _measure(jax, jnp, NamedSharding, P, ring_fn, args, seq_len, sp, causal, chunk, dtype, common):
    mesh = jax.make_mesh((sp,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:sp])
    blockwise_kwargs = dict(
        causal_block_size=1 if causal else None,
        deterministic=True,
        dropout_rng=None,
        attn_pdrop=0.0,
        query_chunk_size=chunk,
        key_chunk_size=chunk,
        dtype=dtype,
        policy=jax.checkpoint_policies.nothing_saveable,
        precision=None,
        prevent_cse=True,
    )
    spec = P(None, "sp", None, None)

    def local(q, k, v):
        # attn_bias, segment_ids, cache_idx = None: plain (causal or full) attention, training mode
        return ring_fn(q, k, v, None, None, None, "sp", True, blockwise_kwargs)

    attention = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)

    def loss(q, k, v, w):
        return jnp.sum(attention(q, k, v).astype(jnp.float32) * w)

    grad = jax.grad(loss, argnums=(0, 1, 2))
    shape = (args.batch, seq_len, args.heads, args.head_dim)
    keys = jax.random.split(jax.random.key(0), 4)
    sharding = NamedSharding(mesh, spec)
    q, k, v = (jax.device_put(jax.random.normal(kk, shape, dtype), sharding) for kk in keys[:3])
    w = jax.device_put(jax.random.normal(keys[3], shape, jnp.float32), sharding)
    t0 = time.perf_counter()
    out = common.compile_and_measure(grad, (q, k, v, w), reps=args.reps, budget_s=args.budget)
    out["total_s"] = time.perf_counter() - t0
    return out


if __name__ == "__main__":
    sys.exit(main())
