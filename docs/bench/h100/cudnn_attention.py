"""The yardstick for `lvm bench attention` on a GPU: cuDNN's fused attention (fwd+bwd) as a fraction of matmul FLOP/s."""

import time

import jax
import jax.numpy as jnp


def bench(f, args, reps=5):
    f(*args)[0].block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return min(ts)


n = 8192
a = jnp.ones((n, n), jnp.bfloat16)
mm = jax.jit(lambda a, b: (a @ b,))
t = bench(mm, (a, a))
mm_flops = 2 * n**3 / t
print(f"matmul {mm_flops / 1e12:.0f} TFLOP/s")
H, D = 32, 128
for S in (8192, 32768):
    for causal in (True, False):
        ks = jax.random.split(jax.random.key(0), 4)
        q, k, v, w = (jax.random.normal(kk, (1, S, H, D), jnp.bfloat16) for kk in ks)

        def loss(q, k, v, causal=causal, w=w):
            o = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
            return jnp.sum(o.astype(jnp.float32) * w)

        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        t = bench(g, (q, k, v))
        flops = 3 * 4.0 * S**2 * D * H * (0.5 if causal else 1)
        print(
            f"cudnn S={S} causal={causal}: {t * 1e3:.1f} ms, {flops / t / 1e12:.0f} TFLOP/s = {100 * flops / t / mm_flops:.0f}% of matmul"
        )
