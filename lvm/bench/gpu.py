"""One-GPU check (`scripts/gpu_check.sh`): matmul, fused attention against cuDNN, and the 1B model's training.

Sections, run in this order, each with its own time budget (seconds a section leaves unused go to the next one;
a section that runs short skips its remaining cases with a note saying why):

  matmul       bf16 [n, n] x [n, n] FLOP/s: the yardstick.
  attention    forward+backward of cuDNN's fused attention (`jax.nn.dot_product_attention`, "cudnn") and of ours
               through `sharded_attention` on a 1-device mesh: kernel "fused" (its default tiles) and kernel "xla"
               (q_chunk = kv_chunk = 2048); 8K, 32K and 128K tokens, causal and full, batch 1, 32 heads x 128,
               bf16. FLOP/s, ratios to the matmul and to cuDNN, and each kernel's gradients against cuDNN's.
  train        one training step of the 1B model (configs/model/1b.yaml) at 32K tokens on one GPU: tokens/s and
               MFU (lvm.metrics.flops_per_token), attention.kernel=fused, then xla.
  max_context  the longest sequence whose 1B training step fits the GPU: XLA's compiled memory analysis of the
               step at doubling / predicted / bisected lengths against the device's memory, then one real step at
               the longest fitting length whose step time fits the budget.

Every measurement is compiled first and timed after a warm-up call (block_until_ready; median of a few calls).
OUT/gpu_check.json and OUT/gpu_check.md are rewritten after every measurement, so a run that is cut short keeps
what it measured. OUT defaults to docs/bench/<card>/ (card: h100, h200, ... from the device kind).

`--smoke` runs every path with tiny shapes (512 tokens, 2 heads x 64, configs/model/tiny.yaml with one layer); on
CPU the fused kernels run in Pallas interpret mode and XLA's attention stands in for cuDNN. Run as
`python -m lvm.bench.gpu [--smoke] [--out DIR]` with the repository root on PYTHONPATH. It is not an `lvm bench`
subcommand: that registry imports every benchmark module before jax may start, and this one imports jax.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import pathlib
import re
import signal
import statistics
import sys
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lvm.attention import sharded_attention
from lvm.attention.ring import choose_kernel
from lvm.bench import common
from lvm.bench.attention import model_flops as attention_flops
from lvm.config import load_config
from lvm.metrics import flops_per_token, peak_flops
from lvm.model import Batch, batch_shardings, init_opt_state, init_params, make_train_step
from lvm.optim import make_optimizer
from lvm.planner import abstract_args
from lvm.sharding import make_mesh

STARTED = time.perf_counter()  # the run's deadline counts from here (before jax starts its backend)
REPO = pathlib.Path(__file__).resolve().parents[2]
SECTIONS = ("matmul", "attention", "train", "max_context")
IMPLS = ("cudnn", "fused", "xla")  # run order at each length and mask: cuDNN first, it is the reference
FUSED_VS_CUDNN = 0.8  # target: fused fwd+bwd FLOP/s at 32K causal over cuDNN's
MFU_TARGET = 0.40  # target: MFU of the 1B step at 32K
GRAD_TOLERANCE = 3e-2  # max |g - g_cudnn| / max |g_cudnn| for bf16, as in tests/test_attention.py
ENV_KEYS = (
    "XLA_PYTHON_CLIENT_PREALLOCATE",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "XLA_FLAGS",
    "JAX_COMPILATION_CACHE_DIR",
)
USABLE_MEMORY = 0.95  # a step "fits" when XLA's peak is at most this fraction of the device's memory limit

NOTES = [
    "Attention FLOPs (model FLOPs, one convention for every row): forward 4*S^2*D*H, backward 2x forward, so "
    "fwd+bwd = 12*S^2*D*H per batch row, HALVED when causal. Kernels that skip masked tiles still compute the "
    "diagonal tiles and the backward recomputes the scores, so hardware FLOPs exceed these.",
    "Times: compiled first (lower().compile()), one warm-up call, then up to `reps` calls with "
    "block_until_ready, stopping early (after 2) when a case's timing budget is spent; the headline is the "
    "median. 'compile' is lower+compile wall time.",
    "Training FLOPs: lvm.metrics.flops_per_token (6 x matmul parameters incl. both output heads + 6*L*H*D*S "
    "causal attention) x tokens; rematerialisation is not counted. MFU uses lvm.metrics.PEAK_FLOPS "
    "(vendor dense bf16 peak; H100 SXM/H200 989 TFLOP/s); 'of matmul' uses the measured matmul instead.",
    "Max context: XLA's compiled memory analysis of the whole training step (arguments + outputs - aliased + "
    f"temporaries + code) against {USABLE_MEMORY:.0%} of the device's memory limit (bytes_limit of the "
    "allocator: XLA_PYTHON_CLIENT_MEM_FRACTION of the card); lengths are doubled, then predicted from a "
    "straight line through the probes (memory grows linearly with length), then bisected. A real step then "
    "runs at the longest fitting length whose estimated time (the 32K step scaled by model FLOPs) fits.",
]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run measures: FULL on the GPU; SMOKE runs the same code paths with tiny shapes (CPU tests)."""

    seq_lens: tuple[int, ...]  # attention lengths
    heads: int
    head_dim: int
    dtype: str
    xla_chunk: int  # q_chunk = kv_chunk of kernel "xla" (its best GPU tile)
    target_seq: int  # attention length of the fused-vs-cuDNN target
    matmul_n: int
    model: str  # model config of the training sections
    model_overrides: tuple[str, ...]  # config overrides of the model (smoke: fewer layers, faster compiles)
    train_seq: int
    context_step: int  # max-context lengths are multiples of this
    context_max: int  # longest length probed
    reps: int  # timed calls per measurement after the warm-up
    case_timing_s: float  # stop timing a case after this many seconds (at least 2 calls)
    budgets: dict[str, float]  # seconds per section
    deadline_s: float  # the whole run, from process start
    default_compile_s: float  # compile time assumed for a program of a kind not compiled yet


FULL = Settings(
    seq_lens=(8192, 32768, 131072),
    heads=32,
    head_dim=128,
    dtype="bfloat16",
    xla_chunk=2048,
    target_seq=32768,
    matmul_n=8192,
    model="model/1b",
    model_overrides=(),
    train_seq=32768,
    context_step=16384,
    context_max=1 << 22,
    reps=5,
    case_timing_s=4.0,
    budgets={"matmul": 15, "attention": 150, "train": 80, "max_context": 70},
    deadline_s=330,
    default_compile_s=15,
)
SMOKE = dataclasses.replace(
    FULL,
    seq_lens=(512,),
    heads=2,
    head_dim=64,
    xla_chunk=128,
    target_seq=512,
    matmul_n=256,
    model="model/tiny",
    model_overrides=("model.n_layers=1",),
    train_seq=512,
    context_step=256,
    context_max=1024,
    reps=2,
    case_timing_s=0.5,
    budgets={"matmul": 30, "attention": 120, "train": 120, "max_context": 120},
    deadline_s=600,
    default_compile_s=5,
)


# ----------------------------------------------------------------------------------------------------------
# Time budgets


@dataclasses.dataclass
class Section:
    """One section's time budget and what it skipped."""

    name: str
    budget_s: float
    start: float = dataclasses.field(default_factory=lambda: time.perf_counter())
    notes: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def allows(self, estimate_s: float, what: str) -> bool:
        """Whether `what` (estimated at `estimate_s`) fits the time left; if not, a note says it was skipped."""
        if estimate_s <= self.left():
            return True
        self.notes.append(
            f"skipped {what}: needs about {estimate_s:.0f} s, {max(self.left(), 0):.0f} s left of the "
            f"{self.name} budget"
        )
        print(f"  {self.notes[-1]}", flush=True)
        return False

    def record(self) -> dict[str, Any]:
        return {
            "budget_s": round(self.budget_s, 1),
            "used_s": round(time.perf_counter() - self.start, 1),
            "notes": self.notes,
            "error": self.error,
        }


class Budget:
    """Sections get their nominal seconds plus what earlier ones left unused (minus what they overran), never
    past the run's deadline."""

    def __init__(self, nominal: dict[str, float], deadline_s: float, started: float = STARTED):
        self.nominal = dict(nominal)
        self.deadline = started + deadline_s
        self.carry = 0.0

    def open(self, name: str) -> Section:
        seconds = min(self.nominal[name] + self.carry, self.deadline - time.perf_counter())
        return Section(name, max(seconds, 0.0))

    def close(self, section: Section) -> None:
        self.carry = section.left()


# ----------------------------------------------------------------------------------------------------------
# Measuring


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


def _error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= 600 else text[:600] + " ..."


# ----------------------------------------------------------------------------------------------------------
# The run: settings, results, and the report written after every measurement


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
            "targets": {},
            "sections": {},
            "notes": list(NOTES),
        }

    def save(self) -> None:
        self.payload["targets"] = evaluate_targets(self)
        self.payload["wall_s"] = round(time.perf_counter() - STARTED, 1)
        common.write_json(self.out_dir / "gpu_check.json", self.payload)
        (self.out_dir / "gpu_check.md").write_text(render_markdown(self.payload))


# ----------------------------------------------------------------------------------------------------------
# Section: matmul


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


# ----------------------------------------------------------------------------------------------------------
# Section: attention


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
        row = {**case, "flops": attention_flops(n, s.heads, s.head_dim, 1, causal)}
        run.payload["attention"].append(row)
        what = f"{impl} S={n} {'causal' if causal else 'full'}"
        if not section.allows(estimate_case_s(run, case, row["flops"]), what):
            row["skipped"] = section.notes[-1]
            continue
        try:
            row.update(describe_impl(run, impl, n))
            if n not in inputs:  # one length's arrays at a time
                inputs = {n: _attention_inputs(n, s.heads, s.head_dim, dtype)}
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
            row["error"] = _error(err)
        finally:
            reference = {k: v for k, v in reference.items() if k[0] == n}
            _derive_attention(run)
            run.save()
        _print_attention(row)


def _attention_inputs(n: int, heads: int, head_dim: int, dtype) -> tuple:
    keys = jax.random.split(jax.random.key(n), 4)
    shape = (1, n, heads, head_dim)
    q, k, v = (jax.random.normal(key, shape, dtype) for key in keys[:3])
    return q, k, v, jax.random.normal(keys[3], shape, jnp.float32)


def _derive_attention(run: Run) -> None:
    rows = run.payload["attention"]
    for row in rows:
        if not row.get("time_s"):
            continue
        if run.matmul_flops:
            row["of_matmul"] = row["flops_per_s"] / run.matmul_flops
        ref = _find(rows, seq_len=row["seq_len"], causal=row["causal"], impl="cudnn")
        if ref:
            row["of_cudnn"] = row["flops_per_s"] / ref["flops_per_s"]


def _find(rows, **match):
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()) and row.get("time_s"):
            return row
    return None


def _print_attention(row) -> None:
    what = f"{row['impl']:<5} S={row['seq_len']:<6} {'causal' if row['causal'] else 'full  '}"
    if row.get("time_s"):
        err = f", grad err {row['grad_max_rel_err']:.1e}" if "grad_max_rel_err" in row else ""
        print(
            f"  {what} {common.fmt_seconds(row['time_s'])}, {_tf(row['flops_per_s'])} TFLOP/s "
            f"(compile {row['compile_s']:.1f} s{err})",
            flush=True,
        )
    elif row.get("error"):
        print(f"  {what} error: {row['error'][:200]}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# The model: config, compiled step, batch, one timed step


def model_config(run: Run, seq_len: int, kernel: str):
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


# ----------------------------------------------------------------------------------------------------------
# Section: train


def run_train(run: Run, section: Section) -> None:
    s = run.settings
    for kernel in ("fused", "xla"):
        row: dict[str, Any] = {"kernel": kernel, "seq_len": s.train_seq, "model": s.model}
        run.payload["train"].append(row)
        cfg = model_config(run, s.train_seq, kernel)
        compiled_before = [r["compile_s"] for r in run.payload["train"] if r.get("compile_s")]
        compile_est = max(compiled_before, default=2 * s.default_compile_s)
        slower = 1.0 if kernel == "fused" else 3.0  # the xla kernel's attention is several times slower
        estimate = 1.2 * compile_est + 4 * slower * estimate_step_s(run, cfg)
        if not section.allows(estimate, f"the {kernel} training step at {s.train_seq}"):
            row["skipped"] = section.notes[-1]
            continue
        try:
            step = compile_step(run, cfg)
            row.update(compile_s=step["compile_s"], memory=step["memory"], tiles=_model_tiles(run, cfg))
            run.state.setdefault("probes", {}).setdefault(kernel, {})[s.train_seq] = step
            row.update(run_steps(run, step, s.reps, 2 * s.case_timing_s))
            derive_step(run, row, cfg)
            print(
                f"  train {kernel} S={s.train_seq}: {common.fmt_seconds(row['step_s'])}/step, "
                f"{row['tokens_per_s']:.0f} tokens/s, MFU {row['mfu']:.1%} (compile {row['compile_s']:.1f} s)",
                flush=True,
            )
        except Exception as err:
            row["error"] = _error(err)
            print(f"  train {kernel} error: {row['error'][:300]}", flush=True)
        finally:
            run.save()


def _model_tiles(run: Run, cfg) -> dict[str, Any]:
    m, a = cfg.model, cfg.attention
    target, fwd, bwd = choose_kernel(
        a.kernel, run.backend, cfg.train.seq_len, 1, a.layout, m.head_dim, a.q_chunk, a.kv_chunk
    )
    return {
        "kernel": "xla" if target is None else target.flavour,
        "forward": list(fwd),
        "backward": list(bwd),
    }


# ----------------------------------------------------------------------------------------------------------
# Section: max_context


def next_probe(peaks: dict[int, int], usable: float, step: int, longest: int) -> int | None:
    """The next length to compile, or None when the search is done.

    `peaks`: compiled peak bytes by length. Below the first fitting length and above the last: halve / double
    until a second point exists, then go to the length a straight line through the two longest probes predicts
    (rounded down to `step`), kept strictly inside the bracket of the longest fitting and shortest failing
    length, so every probe narrows it; done when the bracket is one `step` wide or the line's length is probed.
    """
    fits = [n for n, p in peaks.items() if p <= usable]
    over = [n for n, p in peaks.items() if p > usable]  # a length that failed to compile has peak inf
    lo, hi = max(fits, default=0), min(over, default=None)
    if hi is not None and hi - lo <= step:
        return None
    line = sorted((n, p) for n, p in peaks.items() if p != float("inf"))[-2:]
    if len(line) < 2:
        guess = 2 * lo if lo else hi // 2
    else:
        (n1, p1), (n2, p2) = line
        slope = (p2 - p1) / (n2 - n1)
        guess = int(n2 + (usable - p2) / slope) if slope > 0 else 2 * n2
    guess = max(guess // step * step, lo + step)
    if hi is not None:
        guess = min(guess, hi - step)
    guess = min(guess, longest // step * step)
    return None if guess <= lo or guess in peaks else guess


def run_max_context(run: Run, section: Section) -> None:
    s = run.settings
    limit = run.memory_limit or device_memory_limit()
    result: dict[str, Any] = {"memory_limit_bytes": limit, "usable_fraction": USABLE_MEMORY, "probes": []}
    run.payload["max_context"] = result
    probes = run.state.setdefault("probes", {})
    kernel = "fused" if probes.get("fused") or "fused" not in _failed_train_kernels(run) else "xla"
    result["kernel"] = kernel
    steps = probes.setdefault(kernel, {})
    if s.train_seq not in steps and section.allows(
        2.4 * s.default_compile_s, f"compiling the step at {s.train_seq}"
    ):
        _probe(run, result, steps, model_config(run, s.train_seq, kernel))
    if limit is None:
        if not steps:
            result["why_not"] = "no device memory limit and no compiled step"
            return
        limit = int(2 * min(steps.values(), key=lambda p: p["memory"]["peak_bytes"])["memory"]["peak_bytes"])
        result.update(
            memory_limit_bytes=limit, memory_limit_source="stand-in: 2 x the first probe (no limit)"
        )
    else:
        result.setdefault(
            "memory_limit_source", "--memory-limit-bytes" if run.memory_limit else "device bytes_limit"
        )
    usable = USABLE_MEMORY * limit
    for n, step in sorted(steps.items()):
        _record_probe(result, n, step, usable)
    while True:
        peaks = {p["seq_len"]: p.get("peak_bytes", float("inf")) for p in result["probes"]}
        n = next_probe(peaks, usable, s.context_step, s.context_max)
        compile_est = 1.2 * max((p["compile_s"] for p in result["probes"]), default=2 * s.default_compile_s)
        if n is None or not section.allows(compile_est, f"compiling the step at {n}"):
            break
        _probe(run, result, steps, model_config(run, n, kernel), usable)
    _summarise_probes(result, usable)
    run.save()
    confirm_longest(run, section, result, steps)


def _failed_train_kernels(run: Run) -> set[str]:
    return {r["kernel"] for r in run.payload["train"] if r.get("error")}


def _probe(run: Run, result, steps, cfg, usable: float | None = None) -> None:
    n = cfg.train.seq_len
    try:
        steps[n] = compile_step(run, cfg)
        if usable is not None:
            _record_probe(result, n, steps[n], usable)
    except Exception as err:
        result["probes"].append({"seq_len": n, "error": _error(err)})
    run.save()


def _record_probe(result, n: int, step, usable: float) -> None:
    peak = step["memory"]["peak_bytes"]
    result["probes"].append(
        {"seq_len": n, "peak_bytes": peak, "fits": peak <= usable, "compile_s": step["compile_s"]}
    )
    result["probes"].sort(key=lambda p: p["seq_len"])
    print(
        f"  max context: S={n} needs {common.fmt_bytes(peak)} ({'fits' if peak <= usable else 'too big'})",
        flush=True,
    )


def _summarise_probes(result, usable: float) -> None:
    ok = [p for p in result["probes"] if p.get("peak_bytes")]
    fits = [p["seq_len"] for p in ok if p["fits"]]
    over = [p["seq_len"] for p in ok if not p["fits"]]
    result["fits_up_to"] = max(fits, default=None)
    result["too_big_from"] = min(over, default=None)
    if len(ok) >= 2:
        (n1, p1), (n2, p2) = ((p["seq_len"], p["peak_bytes"]) for p in ok[-2:])
        slope = (p2 - p1) / (n2 - n1)
        result["bytes_per_token"] = slope
        result["bytes_at_zero_tokens"] = p2 - slope * n2
        result["predicted_max"] = int(n2 + (usable - p2) / slope) if slope > 0 else None


def confirm_longest(run: Run, section: Section, result, steps) -> None:
    """One real step at the longest fitting length whose estimated time fits the budget (longer ones first)."""
    trained = {
        r["seq_len"] for r in run.payload["train"] if r.get("step_s") and r["kernel"] == result["kernel"]
    }
    lengths = sorted((p["seq_len"] for p in result["probes"] if p.get("fits")), reverse=True)
    for n in lengths:
        if n in trained:
            result["confirmed"] = {"seq_len": n, "by": "the train section's step"}
            break
        step = steps[n]
        estimate = estimate_step_s(run, step["cfg"])
        if not section.allows(1.3 * estimate + 5, f"running one step at {n} (confirming it trains)"):
            result.setdefault("not_run", []).append({"seq_len": n, "estimated_step_s": estimate})
            continue
        row: dict[str, Any] = {"seq_len": n}
        try:
            gc.collect()
            row.update(run_steps(run, step, 0, 0.0))
            row["step_s"] = row["warmup_s"]  # the first call of a compiled step: one-time costs included
            derive_step(run, row, step["cfg"])
            result["confirmed"] = {**row, "by": "one step run here"}
            print(f"  max context: one step at S={n} ran in {row['step_s']:.1f} s", flush=True)
            break
        except Exception as err:
            result.setdefault("failed_runs", []).append({"seq_len": n, "error": _error(err)})
        finally:
            run.save()


# ----------------------------------------------------------------------------------------------------------
# Targets and the markdown report


def evaluate_targets(run: Run) -> dict[str, Any]:
    s, p = run.settings, run.payload
    fused = _find(p["attention"], seq_len=s.target_seq, causal=True, impl="fused")
    cudnn = _find(p["attention"], seq_len=s.target_seq, causal=True, impl="cudnn")
    ratio = fused["flops_per_s"] / cudnn["flops_per_s"] if fused and cudnn else None
    train = next((r for r in p["train"] if r["kernel"] == "fused" and r.get("step_s")), None)
    mfu = train.get("mfu") if train else None
    return {
        "fused_vs_cudnn": {
            "rule": f"fwd+bwd FLOP/s of kernel 'fused' >= {FUSED_VS_CUDNN} x cuDNN's at {s.target_seq} tokens, causal",
            "measured": ratio,
            "met": None if ratio is None else ratio >= FUSED_VS_CUDNN,
        },
        "mfu_1b": {
            "rule": f"{s.model} training step at {s.train_seq} tokens (attention.kernel=fused) >= {MFU_TARGET:.0%} MFU",
            "measured": mfu,
            "met": None if mfu is None else mfu >= MFU_TARGET,
        },
    }


def _tf(x) -> str:
    """TFLOP/s, 3 significant digits below 100 (smoke runs on CPU are far below 1)."""
    return "-" if x is None else f"{x / 1e12:.0f}" if x >= 1e14 else f"{x / 1e12:.3g}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _tiles(row) -> str:
    t = row.get("tiles")
    return f"{t['forward'][0]}x{t['forward'][1]} / {t['backward'][0]}x{t['backward'][1]}" if t else "-"


def _status(row) -> str:
    if row.get("error"):
        return "error: " + row["error"][:80].replace("|", "/")
    return "skipped (budget)" if row.get("skipped") else "-"


def attention_table(rows) -> str:
    body = []
    for r in sorted(rows, key=lambda r: (r["seq_len"], not r["causal"], IMPLS.index(r["impl"]))):
        ok = bool(r.get("time_s"))
        err = r.get("grad_max_rel_err")
        body.append(
            [
                r["seq_len"],
                "causal" if r["causal"] else "full",
                r["impl"],
                _tiles(r),
                common.fmt_seconds(r.get("time_s")) if ok else _status(r),
                _tf(r.get("flops_per_s")),
                _pct(r.get("of_matmul")),
                _pct(r.get("of_cudnn")),
                "-" if err is None else f"{err:.1e}{'' if err <= GRAD_TOLERANCE else ' (!)'}",
                f"{r['compile_s']:.1f}" if ok else "-",
            ]
        )
    headers = ["seq", "mask", "impl", "tiles fwd / bwd", "fwd+bwd", "TFLOP/s", "of matmul", "of cuDNN"]
    return common.markdown_table(headers + ["grad err vs cuDNN", "compile s"], body)


def train_table(rows) -> str:
    body = []
    for r in rows:
        ok = bool(r.get("step_s"))
        mem = (r.get("memory") or {}).get("peak_bytes")
        body.append(
            [
                r["kernel"],
                r["seq_len"],
                common.fmt_seconds(r.get("step_s")) if ok else _status(r),
                f"{r['tokens_per_s']:.0f}" if ok else "-",
                _tf(r.get("model_flops_per_s")),
                _pct(r.get("mfu")),
                _pct(r.get("of_matmul")),
                common.fmt_bytes(mem),
                f"{r['compile_s']:.1f}" if r.get("compile_s") else "-",
                "-" if not ok else ("yes" if r["loss_finite"] else "NO"),
            ]
        )
    headers = [
        "attention.kernel",
        "seq",
        "step",
        "tokens/s",
        "model TFLOP/s",
        "MFU",
        "of matmul",
        "peak memory",
    ]
    return common.markdown_table(headers + ["compile s", "loss finite"], body)


def max_context_text(mc) -> str:
    if not mc:
        return "not run"
    lines = [
        f"Memory limit {common.fmt_bytes(mc.get('memory_limit_bytes'))} ({mc.get('memory_limit_source', '-')}), "
        f"usable {mc['usable_fraction']:.0%}; kernel {mc.get('kernel')}."
    ]
    if mc.get("why_not"):
        lines.append(mc["why_not"])
    probes = [
        [
            p["seq_len"],
            common.fmt_bytes(p.get("peak_bytes")),
            "yes" if p.get("fits") else "NO",
            f"{p['compile_s']:.1f}",
        ]
        if p.get("peak_bytes")
        else [p["seq_len"], "-", "error: " + p["error"][:80], "-"]
        for p in mc.get("probes", [])
    ]
    if probes:
        lines.append(
            "\n" + common.markdown_table(["seq", "compiled peak", "fits", "compile s"], probes) + "\n"
        )
    if mc.get("predicted_max"):
        lines.append(
            f"Straight line through the two longest probes: {common.fmt_bytes(mc['bytes_per_token'])} per token, "
            f"reaching the usable memory at about {mc['predicted_max']} tokens."
        )
    lines.append(
        f"Longest fitting length compiled: {mc.get('fits_up_to')}; shortest too big: {mc.get('too_big_from')}."
    )
    c = mc.get("confirmed")
    if c and c.get("step_s"):
        lines.append(
            f"Confirmed: one step at {c['seq_len']} tokens ran in {c['step_s']:.1f} s ({c['tokens_per_s']:.0f} "
            f"tokens/s, MFU {_pct(c.get('mfu'))}, loss finite: {c['loss_finite']})."
        )
    elif c:
        lines.append(f"Confirmed at {c['seq_len']} tokens by {c['by']}.")
    for nr in mc.get("not_run", []):
        lines.append(f"Not run at {nr['seq_len']}: estimated {nr['estimated_step_s']:.0f} s a step.")
    for fr in mc.get("failed_runs", []):
        lines.append(f"Running at {fr['seq_len']} failed: {fr['error'][:200]}")
    return "\n".join(lines)


def targets_table(targets) -> str:
    def fmt(key, t):
        if t["measured"] is None:
            return "not measured"
        return f"{t['measured']:.2f}x cuDNN" if key == "fused_vs_cudnn" else f"{t['measured']:.1%}"

    met = lambda m: "n/a" if m is None else ("yes" if m else "NO")
    rows = [[t["rule"], fmt(k, t), met(t["met"])] for k, t in targets.items()]
    return common.markdown_table(["target", "measured", "met"], rows)


def render_markdown(p: dict[str, Any]) -> str:
    m, s, mm = p["machine"], p["settings"], p["matmul"]
    head = (
        f"# GPU check{' (SMOKE: tiny shapes, not a measurement)' if p['smoke'] else ''}\n\n"
        f"{m['device_kind']} ({m['backend']}), memory limit {common.fmt_bytes(m.get('memory_limit_bytes'))}; "
        f"jax {m['jax_version']}, Python {m['python']}, {m['cpu_count']} CPUs ({m['cpu_model']}); {p['created']}; "
        f"{p.get('wall_s', 0):.0f} s in all.\n\n"
        f"Matmul {s['matmul_n']}^3 {s['dtype']}: "
        + (f"{_tf(mm['flops_per_s'])} TFLOP/s (median of {len(mm['times_s'])})." if mm else "not measured.")
    )
    sections = [
        [
            name,
            f"{r['budget_s']:.0f}",
            f"{r['used_s']:.0f}",
            "; ".join(r["notes"] + ([r["error"]] if r["error"] else []))[:300] or "-",
        ]
        for name, r in p["sections"].items()
    ]
    parts = [
        head,
        "## Targets\n\n" + targets_table(p["targets"]),
        f"## Attention fwd+bwd (batch 1, {s['heads']} heads x {s['head_dim']}, {s['dtype']})\n\n"
        + attention_table(p["attention"]),
        f"## Training step ({s['model']}, batch 1, one device)\n\n" + train_table(p["train"]),
        "## Longest trainable context\n\n" + max_context_text(p["max_context"]),
        "## Sections (seconds)\n\n" + common.markdown_table(["section", "budget", "used", "notes"], sections),
        "## Notes\n\n" + "\n".join(f"- {n}" for n in p["notes"]),
    ]
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Command line


SECTION_FUNCS = {
    "matmul": run_matmul,
    "attention": run_attention,
    "train": run_train,
    "max_context": run_max_context,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, every code path (CPU tests)")
    parser.add_argument("--out", help="output folder (default: docs/bench/<card>/)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="SECTION=SECONDS",
        help="override one section's time budget (repeatable), e.g. max_context=500",
    )
    parser.add_argument("--deadline", type=float, help="seconds for the whole run, from process start")
    parser.add_argument(
        "--memory-limit-bytes", type=int, help="device memory to fit (default: the allocator's)"
    )


def settings_from_args(args) -> Settings:
    s = SMOKE if args.smoke else FULL
    budgets = dict(s.budgets)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in budgets or not seconds:
            raise ValueError(f"--budget {item!r}: write SECTION=SECONDS with SECTION one of {SECTIONS}")
        budgets[name] = float(seconds)
    return dataclasses.replace(s, budgets=budgets, deadline_s=args.deadline or s.deadline_s)


def run(args) -> int:
    settings = settings_from_args(args)
    kind = jax.devices()[0].device_kind
    out_dir = pathlib.Path(args.out) if args.out else REPO / "docs" / "bench" / card_slug(kind)
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = Run(settings, out_dir, args.smoke, args.memory_limit_bytes)
    print(
        f"gpu check: {kind} ({bench.backend}), jax {jax.__version__}, writing {out_dir}"
        f"{' (smoke)' if args.smoke else ''}",
        flush=True,
    )
    budget = Budget(settings.budgets, settings.deadline_s)
    signal.signal(signal.SIGTERM, _on_sigterm)
    for name in SECTIONS:
        if name not in args.sections:
            continue
        section = budget.open(name)
        print(f"[{name}] budget {section.budget_s:.0f} s", flush=True)
        try:
            SECTION_FUNCS[name](bench, section)
        except Exception as err:  # a broken section must not lose the others
            section.error = _error(err)
            traceback.print_exc()
        finally:
            budget.close(section)
            bench.payload["sections"][name] = section.record()
            bench.save()
    print("\n" + render_markdown(bench.payload))
    print(f"wrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'}")
    return 0


def _on_sigterm(signum, frame):
    raise SystemExit(f"stopped by signal {signum} (time limit): the report holds what was measured so far")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lvm.bench.gpu", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
