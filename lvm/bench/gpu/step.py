"""The model's training step on one device, shared by the train and max_context sections: its config, the
compiled step with its memory analysis, a batch, timed steps, and the numbers derived from a step's time."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from lvm.bench import common
from lvm.config import load_config
from lvm.metrics import flops_per_token, peak_flops
from lvm.model import Batch, batch_shardings, init_opt_state, init_params, make_train_step
from lvm.optim import make_optimizer
from lvm.planner import abstract_args
from lvm.sharding import make_mesh

if TYPE_CHECKING:
    from lvm.bench.gpu.run import Run


def model_config(run: Run, seq_len: int, kernel: str):
    """The run's model at `seq_len` tokens, batch 1, one device, attention kernel `kernel`."""
    overrides = [
        f"train.seq_len={seq_len}",
        "train.batch_size=1",
        "mesh=1,1,1,1",
        f"attention.kernel={kernel}",
    ]
    return load_config([run.settings.model], [*run.settings.model_overrides, *overrides])


def compile_step(run: Run, cfg) -> dict[str, Any]:
    """Compile cfg's training step on one device from abstract arguments; its memory analysis and executable."""
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    optimizer = make_optimizer(cfg.train)
    t0 = time.perf_counter()
    compiled = make_train_step(cfg, mesh, optimizer).lower(*abstract_args(cfg, mesh, optimizer)).compile()
    compile_s = time.perf_counter() - t0
    mem = common.memory_stats(compiled)
    peak = sum(mem[k] or 0 for k in ("argument_bytes", "output_bytes", "temp_bytes", "generated_code_bytes"))
    mem["peak_bytes"] = peak - (mem["alias_bytes"] or 0)  # outputs written over donated inputs count once
    return dict(compiled=compiled, compile_s=compile_s, memory=mem, cfg=cfg, mesh=mesh, opt=optimizer)


def make_batch(cfg, mesh) -> Batch:
    """One packed row: the first half text, the second half vision tokens, one document, every target scored."""
    n, m = cfg.train.seq_len, cfg.model
    rng = np.random.default_rng(0)
    vision = np.arange(n)[None] >= n // 2
    tokens = np.where(
        vision, rng.integers(0, m.vision_vocab_size, (1, n)), rng.integers(0, m.text_vocab_size, (1, n))
    )
    fields = Batch(
        tokens=tokens.astype(np.int32),
        vision_mask=vision,
        positions=np.arange(n, dtype=np.int32)[None],
        segment_ids=np.ones((1, n), np.int32),
        targets=np.roll(tokens, -1, axis=1).astype(np.int32),
        target_vision_mask=np.roll(vision, -1, axis=1),
        loss_mask=np.ones((1, n), np.float32),
    )
    return Batch(*(jax.device_put(x, sh) for x, sh in zip(fields, batch_shardings(mesh), strict=True)))


def model_state(run: Run, step: dict[str, Any]) -> tuple:
    """Parameters and optimizer state (made once: their shapes do not depend on the length or the kernel)."""
    leaves = jax.tree.leaves([run.state.get("params"), run.state.get("opt_state")])
    if "params" not in run.state or any(x.is_deleted() for x in leaves):  # a failed step may have eaten them
        cfg, mesh = step["cfg"], step["mesh"]
        params = init_params(cfg, mesh, jax.random.key(0))
        run.state["params"], run.state["opt_state"] = params, init_opt_state(cfg, mesh, step["opt"], params)
    return run.state.pop("params"), run.state.pop("opt_state")


def run_steps(run: Run, step: dict[str, Any], n_timed: int, timing_s: float) -> dict[str, Any]:
    """Warm-up step then up to `n_timed` timed steps (fewer once `timing_s` is spent); the state is threaded
    through (it is donated) and kept for the next measurement."""
    batch = make_batch(step["cfg"], step["mesh"])
    params, opt_state = model_state(run, step)
    times, losses = [], []
    try:
        for i in range(n_timed + 1):
            t0 = time.perf_counter()
            params, opt_state, metrics = step["compiled"](params, opt_state, batch)
            losses.append(float(jax.block_until_ready(metrics)["loss"]))
            times.append(time.perf_counter() - t0)
            if i >= min(n_timed, 2) and (i >= n_timed or sum(times[1:]) >= timing_s):
                break
    finally:
        run.state["params"], run.state["opt_state"] = params, opt_state  # the donated inputs are gone
    timed = times[1:] or times
    return {
        "warmup_s": times[0],
        "step_times_s": timed,
        "step_s": statistics.median(timed),
        "loss": losses[-1],
        "loss_finite": bool(np.isfinite(losses).all()),
    }


def step_flops(cfg) -> float:
    return flops_per_token(cfg) * cfg.train.seq_len * cfg.train.batch_size


def derive_step(run: Run, row: dict[str, Any], cfg) -> None:
    """tokens/s, model FLOP/s, MFU (vendor peak; on a device without one, the measured matmul stands in)."""
    tokens = cfg.train.seq_len * cfg.train.batch_size
    row["tokens_per_s"] = tokens / row["step_s"]
    row["flops_per_token"] = flops_per_token(cfg)
    row["model_flops_per_s"] = step_flops(cfg) / row["step_s"]
    peak = peak_flops(run.payload["machine"]["device_kind"])
    row["peak_flops_source"] = "lvm.metrics.PEAK_FLOPS" if peak else "measured matmul (no vendor peak known)"
    peak = peak or run.matmul_flops
    row["peak_flops"] = peak
    row["mfu"] = row["model_flops_per_s"] / peak if peak else None
    if run.matmul_flops:
        row["of_matmul"] = row["model_flops_per_s"] / run.matmul_flops


def estimate_step_s(run: Run, cfg) -> float:
    """A step of cfg scaled from the measured training step by model FLOPs (or at 25% of the matmul)."""
    done = [r for r in run.payload["train"] if r.get("step_s")]
    if done:
        base = min(done, key=lambda r: r["step_s"])
        return base["step_s"] * step_flops(cfg) / (base["flops_per_token"] * base["seq_len"])
    return step_flops(cfg) / (0.25 * (run.matmul_flops or 1e12))
