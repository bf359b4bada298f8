"""Capacity planning: compile (never run) one training step from abstract shapes and report per-device memory.

The step is `lvm.model.make_train_step` lowered with `jax.ShapeDtypeStruct` arguments that carry their
shardings, so no weight is ever materialised. It is compiled ahead of time for a real TPU topology when `libtpu`
is installed (`jax.experimental.topologies`, as MaxText's AOT compile does), otherwise for simulated CPU devices
(an estimate only, and the report says so: the CPU compiler fuses, pads and schedules differently, so TPU memory
can differ a lot). XLA's memory analysis then gives per-device argument, output, aliased and temporary bytes; a
plan that does not fit re-plans a few variants (more sp, rematerialisation, smaller chunks, more grad
accumulation, more devices) and reports which fit. Only variants that compile are offered: one that is invalid
for the config, needs more simulated devices than the process has, or repeats another is listed, with why,
under `not_offered`.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import importlib.util
import math
import os
import re
import time

import jax
import numpy as np

from lvm.attention.chunking import default_chunk, run_length
from lvm.attention.ring import choose_kernel
from lvm.batch import abstract_batch
from lvm.config import Config, ConfigError
from lvm.model import (
    DEFAULT_FFN_CHUNK,
    DEFAULT_LOSS_CHUNK,
    make_train_step,
    opt_state_shardings,
    param_count,
    param_shapes,
    param_shardings,
)
from lvm.optim import make_optimizer
from lvm.sharding import make_mesh

GIB = 1 << 30
LIBTPU_HINT = "TPU compile needs libtpu: pip install -e '.[plan]'"
CPU_NOTE = (
    "a CPU estimate, not a TPU verdict: XLA's CPU compiler fuses, pads and schedules differently from TPU, so TPU "
    "memory can differ a lot (the 7B 1M-token stage on 256 v4 chips: 33.4 GiB per device on CPU, 11.6 GiB in "
    "the TPU compile); for a TPU compile install libtpu: pip install -e '.[plan]'"
)
# a Mosaic (Pallas TPU) kernel in compiled HLO text: a custom call whose backend config carries the kernel's
# serialized MLIR module in base64 (JSON inside the HLO text, its quotes escaped or not)
MOSAIC_BODY = re.compile(r'\\?"body\\?"\s*:\s*\\?"(?P<b64>[A-Za-z0-9+/=]+)')
KERNEL_NAME = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*_kernel(?![A-Za-z0-9_])")  # the kernel function's symbol
HBM_OOM = re.compile(
    r"HLO temporaries \((?P<temp>[\d.]+[KMGT]?)\) exceeds available HBM \((?P<hbm>[\d.]+[KMGT]?)\)"
)


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_gib: float  # HBM per chip
    chip_config: str  # libtpu chip config: "megacore" fuses a chip's two TensorCores into one device
    ndim: int  # dimensions of the topology string (v4: 4x4x4, v5e: 16x16)
    cores: int  # TensorCores per chip, for the accelerator-type name (v4-512 has 256 chips)
    pod_name: str  # accelerator-type prefix (v4-512, v5litepod-256, v5p-512)


CHIPS = {
    "v4": Chip(32.0, "megacore", 3, 2, "v4"),
    "v5e": Chip(16.0, "default", 2, 1, "v5litepod"),
    "v5p": Chip(95.0, "megacore", 3, 2, "v5p"),
}


# ----------------------------------------------------------------------------------------------------------
# Devices: a TPU topology (ahead of time) or simulated CPU devices


def topology_name(chip: str, n_chips: int) -> str:
    """The usual topology string with `n_chips` chips, e.g. ("v4", 256) -> "v4:4x8x8", ("v5e", 8) -> "v5e:2x4"."""
    spec = _chip(chip)
    k = int(math.log2(n_chips)) if n_chips > 0 else -1
    if n_chips <= 0 or 2**k != n_chips:
        raise ConfigError(f"{n_chips} chips: TPU {chip} slices have a power-of-two chip count; pick one")
    if spec.ndim == 2:
        return f"{chip}:{2 ** (k // 2)}x{2 ** (k - k // 2)}"
    if n_chips < 4:
        raise ConfigError(f"{n_chips} chips: the smallest TPU {chip} slice has 4 chips (2x2x1)")
    exps = [1, 1, 0]  # 2x2x1, then grow the smallest dimension (the last one among equals): 2x2x2, 2x2x4, ...
    for _ in range(k - 2):
        low = min(exps)
        exps[max(i for i, e in enumerate(exps) if e == low)] += 1
    return f"{chip}:" + "x".join(str(2**e) for e in exps)


def parse_topology(name: str) -> tuple[str, int]:
    """ "v4:4x4x4" -> ("v4", 64)."""
    chip, _, dims = name.partition(":")
    try:
        n = math.prod(int(d) for d in dims.split("x"))
    except ValueError:
        n = 0
    if chip not in CHIPS or n <= 0:
        raise ConfigError(
            f"topology {name!r}: write it as CHIP:AxBxC with CHIP in {sorted(CHIPS)}, e.g. v4:4x4x4"
        )
    return chip, n


def tpu_devices(topology: str) -> list:
    """The devices of a TPU topology for ahead-of-time compiles (one per chip); needs the `libtpu` package."""
    if importlib.util.find_spec("libtpu") is None:
        raise ImportError("libtpu is not installed (pip install -e '.[plan]')")
    chip, n = parse_topology(topology)
    spec = CHIPS[chip]
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{spec.pod_name}-{n * spec.cores}")  # quiets libtpu
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip is opened: concurrent plans are safe
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(
        topology_name=topology, platform="tpu", chip_config_name=spec.chip_config
    )
    return list(topo.devices)


def cpu_devices(n: int) -> list:
    """`n` simulated CPU devices; jax fixes their count at start-up, so fewer is an error naming the flag."""
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise ConfigError(
            f"the CPU estimate needs {n} simulated devices but this process has {len(devices)}: run `lvm plan`, "
            f"which starts with enough, or call lvm.cpu_devices.simulate({n}) before jax is imported"
        )
    return devices[:n]


# ----------------------------------------------------------------------------------------------------------
# Abstract arguments and the compiled step's memory


def abstract_args(cfg: Config, mesh, optimizer):
    """(params, opt_state, batch) as sharded ShapeDtypeStructs: the train step's arguments, never allocated."""
    sds = lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
    params = jax.tree.map(sds, param_shapes(cfg.model), param_shardings(cfg, mesh))
    opt_shapes = jax.eval_shape(optimizer.init, param_shapes(cfg.model))
    opt_state = jax.tree.map(sds, opt_shapes, opt_state_shardings(cfg, mesh, optimizer))
    return params, opt_state, abstract_batch(cfg.train.batch_size, cfg.train.seq_len, mesh)


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (its largest shard of each leaf)."""
    leaf = lambda x: math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    return sum(leaf(x) for x in jax.tree.leaves(tree))


def lower_step(cfg: Config, devices: list):
    """`cfg`'s train step lowered for `devices` from abstract arguments: (lowered, cfg with its mesh resolved,
    (params, opt_state, batch) ShapeDtypeStructs). Nothing is allocated; `.compile()` it for the program."""
    mesh_cfg = cfg.mesh.resolve(len(devices))
    cfg = dataclasses.replace(cfg, mesh=mesh_cfg)
    cfg.check_batch_shape(cfg.train.microbatch, cfg.train.seq_len, len(devices))
    mesh = make_mesh(mesh_cfg, devices)
    optimizer = make_optimizer(cfg.train)
    args = abstract_args(cfg, mesh, optimizer)
    return make_train_step(cfg, mesh, optimizer).lower(*args), cfg, args


def mosaic_kernels(hlo_text: str) -> dict[str, int]:
    """The Mosaic (Pallas TPU) kernels of a compiled program's HLO text: {kernel name: custom calls}.

    Each kernel is a `tpu_custom_call` whose backend config holds the kernel's MLIR module, base64-encoded;
    Pallas names the module's function after the kernel function (e.g. `_forward_kernel`)."""
    counts: collections.Counter = collections.Counter()
    for line in hlo_text.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        names = set()
        for body in MOSAIC_BODY.finditer(line):
            names.update(n.decode() for n in KERNEL_NAME.findall(base64.b64decode(body["b64"])))
        counts[", ".join(sorted(names)) or "(unnamed)"] += 1
    return dict(sorted(counts.items()))


def step_memory(cfg: Config, devices: list) -> dict:
    """Compile `cfg`'s train step for `devices` and return its per-device memory in bytes (and, on TPU, the
    Mosaic kernels in the compiled program)."""
    start = time.perf_counter()
    lowered, cfg, (params, opt_state, batch) = lower_step(cfg, devices)
    out = {"params": shard_bytes(params), "opt_state": shard_bytes(opt_state), "batch": shard_bytes(batch)}
    result = {"bytes": out, "mesh": cfg.mesh}
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        oom = HBM_OOM.search(str(err))
        if not oom:
            raise
        # the TPU compiler refuses programs that exceed HBM; it says how much scratch the step needed
        out["arguments"] = out["params"] + out["opt_state"] + out["batch"]
        out["temporaries"] = _parse_bytes(oom["temp"])
        out["peak"] = out["arguments"] + out["temporaries"]  # outputs alias the donated arguments
        result.update(
            usable_hbm_bytes=_parse_bytes(oom["hbm"]), compile_error=_one_line(err), tpu_compile_oom=True
        )
    else:
        stats = compiled.memory_analysis()
        out.update(
            arguments=int(stats.argument_size_in_bytes),
            outputs=int(stats.output_size_in_bytes),
            aliased=int(stats.alias_size_in_bytes),
            temporaries=int(stats.temp_size_in_bytes),
            generated_code=int(stats.generated_code_size_in_bytes),
        )
        # live at the peak: inputs, outputs not written in place of a donated input, scratch, the program
        out["peak"] = (
            out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["generated_code"]
        )
        if devices[0].platform == "tpu":
            result["mosaic_kernels"] = mosaic_kernels(compiled.as_text())
    result["compile_s"] = round(time.perf_counter() - start, 1)
    return result


def _parse_bytes(text: str) -> int:
    """XLA's human-readable sizes: "35.37G" -> bytes (binary units)."""
    units = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
    return int(float(text[:-1] if text[-1] in units else text) * 1024 ** units.get(text[-1], 0))


# ----------------------------------------------------------------------------------------------------------
# The plan


def plan(
    cfg: Config,
    devices: int,
    chip_memory_gib: float | None = None,
    topology: str | None = None,
    chip: str = "v4",
    backend: str = "auto",
    stage: str | None = None,
    suggest: bool = True,
) -> dict:
    """Plan one training step of `cfg` on `devices` chips; a JSON-able report (see the module docstring).

    backend: "tpu" (AOT for `topology`, default: the usual `chip` slice of `devices` chips), "cpu" (simulated
    devices) or "auto" (TPU when libtpu works, else CPU, saying why)."""
    if backend not in ("auto", "tpu", "cpu"):
        raise ConfigError(f"backend {backend!r}: choose auto, tpu or cpu")
    if topology is not None:
        chip, n = parse_topology(topology)
        if n != devices:
            raise ConfigError(
                f"topology {topology} has {n} chips but --devices is {devices}; make them agree"
            )
    _chip(chip)
    mesh = cfg.check_devices(devices)  # a mesh that cannot use `devices` fails here, before any compile
    target = _Target(backend, chip, topology or (topology_name(chip, devices) if backend != "cpu" else None))
    try:  # the kernel the step would use on this platform, checked before any compile
        attention = attention_kernel(cfg, mesh, target.platform)
    except ValueError as err:
        raise ConfigError(f"{err} (attention.kernel / attention.q_chunk / attention.kv_chunk)") from None
    measured = target.compile(cfg, devices)
    memory = chip_memory_gib if chip_memory_gib is not None else CHIPS[chip].hbm_gib
    fits, peak = _fits(measured, memory), measured["bytes"]["peak"]
    margin = memory * GIB - peak  # on a TPU compile OOM, at least what the compiler says is missing
    if "usable_hbm_bytes" in measured:
        margin = min(margin, measured["usable_hbm_bytes"] - measured["bytes"]["temporaries"])
    t = cfg.train
    peak_gib, margin_gib = _gib(peak), _gib(abs(margin))
    if target.devices is not None:
        state = f"FITS, headroom {margin_gib} GiB" if fits else f"DOES NOT FIT, short {margin_gib} GiB"
        verdict = f"peak {peak_gib} GiB of {memory} GiB per chip: {state}"
    else:
        state = f"{margin_gib} GiB to spare" if fits else f"{margin_gib} GiB over"
        verdict = (
            f"CPU estimate: peak {peak_gib} GiB of {memory} GiB per chip, {state}; TPU memory can differ a lot "
            f"({target.tpu_hint})"
        )
    report = {
        "stage": stage,
        "params": param_count(cfg.model),
        "mesh": dict(zip(("dp", "fsdp", "tp", "sp"), measured["mesh"].sizes(), strict=True)),
        "devices": devices,
        "backend": target.label,
        "device_kind": target.device_kind,
        "batch": {"batch_size": t.batch_size, "grad_accum": t.grad_accum, "seq_len": t.seq_len},
        "attention": attention,
        "model": {
            "remat": cfg.model.remat,
            "scan_layers": cfg.model.scan_layers,
            **_model_chunks(cfg, measured["mesh"]),
        },
        "bytes_per_device": measured["bytes"],
        "gib_per_device": {k: _gib(v) for k, v in measured["bytes"].items()},
        "chip_memory_gib": memory,
        "fits": fits,
        "headroom_gib" if fits else "shortfall_gib": margin_gib,
        "verdict": verdict,
        "compile_s": measured["compile_s"],
    }
    if "mosaic_kernels" in measured:
        attention["compiled_mosaic_kernels"] = measured["mosaic_kernels"]
        if attention["kernel"] == "fused" and not measured["mosaic_kernels"]:
            report["warning"] = (
                "the fused attention kernel was chosen but the compiled step has no Mosaic kernel"
            )
    if target.note:
        report["cpu_estimate"] = True
        report["note"] = target.note
    for key in ("compile_error",):
        if measured.get(key):
            report[key] = measured[key]
    if "usable_hbm_bytes" in measured:
        report["usable_hbm_gib"] = _gib(measured["usable_hbm_bytes"])
    if suggest and not report["fits"]:
        report["suggestions"], not_offered = suggestions(cfg, devices, memory, target)
        if not_offered:
            report["not_offered"] = not_offered
    return report


class _Target:
    """Where steps are compiled: TPU AOT for a topology (when possible) or simulated CPU devices."""

    def __init__(self, backend: str, chip: str, topology: str | None):
        self.backend, self.chip, self.topology, self.note = backend, chip, topology, None
        self.devices, self.label, self.tpu_hint = None, None, None
        if backend != "cpu":
            try:
                self.devices = tpu_devices(topology)
                self.label = f"tpu-aot:{topology}"
            except Exception as err:  # noqa: BLE001 - any libtpu failure means: fall back, and say why
                if backend == "tpu":
                    raise ConfigError(
                        f"TPU ahead-of-time compile for {topology} is unavailable: {err}"
                    ) from err
                self.label = f"cpu-simulated (fallback: {_one_line(err)})"
                if importlib.util.find_spec("libtpu") is not None:
                    self.tpu_hint = f"the TPU compile failed: {_one_line(err)}"
        if self.devices is None:
            self.label = self.label or "cpu-simulated (requested)"
            self.tpu_hint = self.tpu_hint or LIBTPU_HINT
            self.note = CPU_NOTE

    @property
    def platform(self) -> str:
        """The platform the step is compiled for ("tpu" or "cpu"): it picks the attention kernel under "auto"."""
        return self.devices[0].platform if self.devices else "cpu"

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind if self.devices else jax.devices("cpu")[0].device_kind

    def compile(self, cfg: Config, n: int) -> dict:
        if self.devices is not None and len(self.devices) == n:
            return step_memory(cfg, self.devices)
        if self.devices is not None:  # another slice size (a suggestion): same chip, usual topology
            return step_memory(cfg, tpu_devices(topology_name(self.chip, n)))
        return step_memory(cfg, cpu_devices(n))


def _fits(measured: dict, memory_gib: float) -> bool:
    return not measured.get("tpu_compile_oom") and measured["bytes"]["peak"] <= memory_gib * GIB


def _gib(n_bytes: float) -> float:
    return float(f"{n_bytes / GIB:.4g}")


def _one_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


def _chip(chip: str) -> Chip:
    if chip not in CHIPS:
        raise ConfigError(f"chip {chip!r} is unknown; choose one of {sorted(CHIPS)}")
    return CHIPS[chip]


def attention_kernel(cfg: Config, mesh, platform: str) -> dict:
    """The ring attention kernel ("xla" or "fused") and the tiles the step uses on `platform` ("tpu", "cpu"),
    resolved as `lvm.model` resolves them; a ValueError names why a requested kernel or tile cannot be used."""
    a = cfg.attention
    block = cfg.train.seq_len // mesh.sp
    target, fwd, bwd = choose_kernel(
        a.kernel, platform, block, mesh.sp, a.layout, cfg.model.head_dim, a.q_chunk, a.kv_chunk
    )
    out = {
        "kernel": "xla" if target is None else "fused",
        "requested": a.kernel,
        "platform": platform,
        "layout": a.layout,
        "layout_run": run_length(a.layout, block, mesh.sp),
        "q_tile": fwd[0],
        "kv_tile": fwd[1],
        "backward_q_tile": bwd[0],
        "backward_kv_tile": bwd[1],
    }
    if target is not None and target.interpret:
        out["interpret"] = True  # Pallas interpret mode on CPU: its memory says nothing about a TPU kernel
    return out


def _model_chunks(cfg: Config, mesh) -> dict:
    """The feed-forward and loss chunk sizes the step uses (explicit or derived from the per-device block)."""
    block = cfg.train.seq_len // mesh.sp
    m = cfg.model
    return {
        "ffn_chunk": m.ffn_chunk or default_chunk(block, DEFAULT_FFN_CHUNK),
        "loss_chunk": m.loss_chunk or default_chunk(block, DEFAULT_LOSS_CHUNK),
    }


def _halved_tiles(cfg: Config, mesh, platform: str) -> tuple[int, int] | None:
    """Half the attention tiles, when the halves suit the kernel in use (fused on TPU: kv a multiple of 128, q of
    8; any kernel: dividing the layout run); else None."""
    att = attention_kernel(cfg, mesh, platform)
    q, kv = att["q_tile"] // 2, att["kv_tile"] // 2
    if q < 1 or kv < 1 or att["layout_run"] % q or att["layout_run"] % kv:
        return None
    a = cfg.attention
    try:  # the kernel in use, not "auto": halved tiles must not quietly switch kernels
        choose_kernel(
            att["kernel"],
            platform,
            cfg.train.seq_len // mesh.sp,
            mesh.sp,
            a.layout,
            cfg.model.head_dim,
            q,
            kv,
        )
    except ValueError:
        return None
    return q, kv


# ----------------------------------------------------------------------------------------------------------
# Suggestions: re-plan the knobs that trade memory for time or devices


def variants(cfg: Config, devices: int, platform: str = "cpu") -> list[tuple[str, int, dict]]:
    """(description, devices, Config.replace kwargs) of each single change that may lower per-device memory;
    `platform` ("tpu" or "cpu") is where the step is compiled (it decides the attention kernel and its tiles)."""
    mesh = cfg.mesh.resolve(devices)
    m, t, a = cfg.model, cfg.train, cfg.attention
    c = _model_chunks(cfg, mesh)
    out = []
    donor = next((ax for ax in ("fsdp", "dp", "tp") if getattr(mesh, ax) % 2 == 0), None)
    if donor:  # a shorter per-device block: activations shrink, parameters are sharded the same (fsdp*sp)
        sp_mesh = dataclasses.replace(mesh, **{donor: getattr(mesh, donor) // 2, "sp": mesh.sp * 2})
        out.append((f"sp x2 (from {donor})", devices, {"mesh": sp_mesh}))
    if m.remat != "full":
        out.append(("model.remat=full", devices, {"model": dataclasses.replace(m, remat="full")}))
    halved = _halved_tiles(cfg, mesh, platform)
    if halved:
        q, kv = halved
        out.append(
            (
                f"attention chunks /2 (q {q}, kv {kv})",
                devices,
                {"attention": dataclasses.replace(a, q_chunk=q, kv_chunk=kv)},
            )
        )
    if c["ffn_chunk"] > 1 and c["loss_chunk"] > 1:
        f, lc = c["ffn_chunk"] // 2, c["loss_chunk"] // 2
        out.append(
            (
                f"ffn/loss chunks /2 ({f}, {lc})",
                devices,
                {"model": dataclasses.replace(m, ffn_chunk=f, loss_chunk=lc)},
            )
        )
    if t.microbatch % 2 == 0:
        out.append(
            (
                f"train.grad_accum={t.grad_accum * 2}",
                devices,
                {"train": dataclasses.replace(t, grad_accum=t.grad_accum * 2)},
            )
        )
    axis = (
        "fsdp" if t.microbatch % (mesh.dp * mesh.fsdp * 2) == 0 else "sp"
    )  # more devices: fsdp while the batch allows
    more = dataclasses.replace(mesh, **{axis: getattr(mesh, axis) * 2})
    return out + [(f"devices x2 ({devices * 2}, {axis} x2)", devices * 2, {"mesh": more})]


def suggestions(
    cfg: Config, devices: int, memory_gib: float, target: _Target
) -> tuple[list[dict], list[dict]]:
    """Re-plan each variant: (the variants that compiled, with their peak and whether they fit; the variants not
    offered, with why: invalid for this config, more simulated devices than this process has, or the same plan
    as the current one or an earlier variant)."""
    offered, not_offered = [], []
    seen = {_plan_key(cfg, devices): "the current config"}
    for change, n, replace in variants(cfg, devices, target.platform):
        variant = dataclasses.replace(cfg, **replace)
        try:
            available = len(jax.devices("cpu"))
            if target.devices is None and n > available:
                raise ConfigError(f"needs {n} simulated CPU devices; this process has {available}")
            key = _plan_key(variant, n)
            if key in seen:
                raise ConfigError(f"the same plan as {seen[key]}")
            seen[key] = change
            variant.check_batch_shape(variant.train.microbatch, variant.train.seq_len, n)
            attention_kernel(variant, variant.mesh.resolve(n), target.platform)
            measured = target.compile(variant, n)
        except (ConfigError, ValueError) as err:
            not_offered.append({"change": change, "devices": n, "why": _one_line(err)})
            continue
        entry = {"change": change, "devices": n, "peak_gib": _gib(measured["bytes"]["peak"])}
        entry.update(fits=_fits(measured, memory_gib), mesh=str(measured["mesh"]))
        entry.update({k: True for k in ("tpu_compile_oom", "split_physical_axes") if measured.get(k)})
        offered.append(entry)
    return offered, not_offered


def _plan_key(cfg: Config, devices: int) -> tuple[int, str]:
    """What a plan compiles: the device count and the config with its mesh resolved (equal keys, equal plans)."""
    return devices, repr(dataclasses.replace(cfg, mesh=cfg.mesh.resolve(devices)))
