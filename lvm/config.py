"""The project's one configuration schema: typed, frozen dataclasses validated when they are built.

A `Config` has one section per concern (`model`, `attention`, `mesh`, `train`, `data`).
Adding a section is adding a dataclass field to `Config`: the loader finds sections and their keys by
introspection. Configs are loaded from YAML files (each file holds sections, later files override earlier ones)
plus `section.key=value` overrides, e.g.

    cfg = load_config(["model/tiny"], ["mesh=1,2,1,4", "attention.q_chunk=128"])

Every bad value fails at load time with a message that names the fix. Checks that need the device count or the
batch shape live in `Config.check_devices` and `Config.check_batch_shape`; the model calls them before tracing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lvm import schema
from lvm.attention.chunking import KERNELS, LAYOUTS, check_layout, resolve_chunks
from lvm.schema import ConfigError
from lvm.schema import choice as _choice
from lvm.schema import positive as _positive
from lvm.schema import require as _require

__all__ = [
    "ConfigError",
    "Config",
    "ModelConfig",
    "AttentionConfig",
    "MeshConfig",
    "TrainConfig",
    "DataConfig",
    "load_config",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DTYPES = ("float32", "bfloat16", "float16")
ROPE_LAYOUTS = ("interleaved", "half")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
MESH_AXES = ("dp", "fsdp", "tp", "sp")
SCHEDULES = ("constant", "cosine")
NONFINITE_POLICIES = ("stop", "skip")
SYNTHETIC_TASKS = ("markov_copy",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """LLaMA-style decoder with separate text and vision embeddings/heads (defaults: LWM-7B)."""

    text_vocab_size: int = 32000
    vision_vocab_size: int = 8448  # 8192 VQGAN codes + <eof>, <eov> + reserved
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int | None = None  # None: d_model // n_heads
    mlp_dim: int = 11008
    rope_theta: float = 10000.0
    rope_layout: str = (
        "interleaved"  # "interleaved": pairs (2i, 2i+1) as in LWM; "half": (i, i + D/2) as in HF
    )
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "full"  # rematerialisation policy of each layer
    scan_layers: bool = True
    ffn_chunk: int | None = None  # tokens per feed-forward chunk (per device); None: derived from the block
    loss_chunk: int | None = None  # tokens per loss chunk (per device); None: derived from the block

    def __post_init__(self):
        _positive(
            "model",
            self,
            (
                "text_vocab_size",
                "vision_vocab_size",
                "d_model",
                "n_layers",
                "n_heads",
                "n_kv_heads",
                "head_dim",
            ),
        )
        _positive("model", self, ("mlp_dim", "rope_theta", "norm_eps", "init_std", "ffn_chunk", "loss_chunk"))
        if self.head_dim is None:
            _require(
                self.d_model % self.n_heads == 0,
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "set model.head_dim explicitly or change the head count",
            )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        _require(
            self.n_heads % self.n_kv_heads == 0,
            f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}; "
            "choose n_kv_heads dividing n_heads (grouped-query attention)",
        )
        _require(self.head_dim % 2 == 0, f"model.head_dim={self.head_dim} must be even for RoPE")
        _choice("model.rope_layout", self.rope_layout, ROPE_LAYOUTS)
        _choice("model.dtype", self.dtype, DTYPES)
        _choice("model.param_dtype", self.param_dtype, DTYPES)
        _choice("model.remat", self.remat, REMAT_POLICIES)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Ring attention settings: the per-step kernel ("auto": fused Pallas kernels on TPU and GPU, XLA blockwise
    elsewhere; "xla"; "fused") and its tile sizes (None: derived from the per-device block for that kernel)."""

    layout: str = "zigzag"
    q_chunk: int | None = None
    kv_chunk: int | None = None
    kernel: str = "auto"

    def __post_init__(self):
        _choice("attention.layout", self.layout, LAYOUTS)
        _choice("attention.kernel", self.kernel, KERNELS)
        _positive("attention", self, ("q_chunk", "kv_chunk"))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes over axes (dp, fsdp, tp, sp); one of them may be -1 to absorb the remaining devices."""

    dp: int = 1
    fsdp: int = -1
    tp: int = 1
    sp: int = 1

    def __post_init__(self):
        sizes = self.sizes()
        _require(
            all(s > 0 or s == -1 for s in sizes),
            f"mesh {self} has a size that is neither positive nor -1; write it as dp,fsdp,tp,sp e.g. 1,-1,4,2",
        )
        _require(
            sizes.count(-1) <= 1, f"mesh {self} has more than one -1; at most one axis can absorb the rest"
        )

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """Parse "dp,fsdp,tp,sp", e.g. "1,-1,4,2"."""
        parts = [p.strip() for p in str(text).split(",")]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        _require(
            len(values) == len(MESH_AXES),
            f"mesh {text!r} must be four integers dp,fsdp,tp,sp such as 1,-1,4,2",
        )
        return cls(*values)

    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, a) for a in MESH_AXES)

    def min_devices(self) -> int:
        """The fewest devices the mesh can run on (the product of its fixed sizes)."""
        return math.prod(s for s in self.sizes() if s != -1)

    def resolve(self, n_devices: int) -> MeshConfig:
        """The mesh with -1 replaced so that the sizes multiply to `n_devices`."""
        sizes = self.sizes()
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            _require(
                n_devices % known == 0,
                f"mesh {self}: {n_devices} devices are not divisible by the fixed axes' product {known}; "
                "change the fixed sizes",
            )
            sizes = tuple(n_devices // known if s == -1 else s for s in sizes)
        _require(
            math.prod(sizes) == n_devices,
            f"mesh {self} uses {math.prod(sizes)} devices but {n_devices} are available; make the product "
            "dp*fsdp*tp*sp equal the device count or set one axis to -1",
        )
        return MeshConfig(*sizes)

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.sizes())


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging and checkpointing of `lvm train` (defaults: LWM's text stages)."""

    seq_len: int = 32768
    batch_size: int = 1  # global rows per optimizer step
    grad_accum: int = 1  # microbatches per step; each holds batch_size / grad_accum rows
    steps: int = 1000
    lr: float = 4e-5  # peak learning rate
    end_lr: float = 0.0  # cosine schedule's final learning rate
    schedule: str = "constant"  # after linear warmup: "constant" or "cosine" (to end_lr at `steps`)
    warmup_steps: int = 0
    b1: float = 0.9
    b2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms: bool = False  # also decay 1-D parameters (norm scales); excluded by default
    clip_norm: float = 1.0  # global gradient-norm clip (0: off)
    seed: int = 0
    log_every: int = 1  # steps between TensorBoard / JSONL records
    eval_every: int = 0  # steps between validation passes (0: only at the end, when data.val is set)
    eval_batches: int = 2
    eval_buckets: int = 4  # validation loss reported per position bucket (equal slices of seq_len)
    checkpoint_every: int = 100
    checkpoint_minutes: float = 0.0  # also checkpoint when this much wall time passed since the last (0: off)
    keep_checkpoints: int = 2
    nonfinite: str = "stop"  # NaN/inf loss or gradient: "stop" with an error, or "skip" the update
    profile_steps: tuple[int, ...] = ()  # (first, last): trace steps first..last-1 to workdir/profile
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None: looked up from the device kind

    def __post_init__(self):
        _positive(
            "train",
            self,
            ("seq_len", "batch_size", "grad_accum", "steps", "lr", "log_every", "eval_batches"),
        )
        _positive("train", self, ("eval_buckets", "checkpoint_every", "keep_checkpoints", "peak_flops"))
        _choice("train.schedule", self.schedule, SCHEDULES)
        _choice("train.nonfinite", self.nonfinite, NONFINITE_POLICIES)
        _require(
            self.batch_size % self.grad_accum == 0,
            f"train.batch_size={self.batch_size} is not divisible by train.grad_accum={self.grad_accum}; "
            "make the batch a multiple of the number of microbatches",
        )
        for name in ("warmup_steps", "end_lr", "weight_decay", "clip_norm", "eval_every"):
            _require(getattr(self, name) >= 0, f"train.{name}={getattr(self, name)} must be >= 0")
        _require(
            0 <= self.checkpoint_minutes < float("inf"),
            f"train.checkpoint_minutes={self.checkpoint_minutes} must be a number of minutes >= 0 (0: off)",
        )
        _require(self.end_lr <= self.lr, f"train.end_lr={self.end_lr} must not exceed train.lr={self.lr}")
        _require(
            self.seq_len % self.eval_buckets == 0,
            f"train.eval_buckets={self.eval_buckets} must divide train.seq_len={self.seq_len}",
        )
        _require(
            len(self.profile_steps) in (0, 2)
            and (not self.profile_steps or 0 <= self.profile_steps[0] < self.profile_steps[1]),
            f"train.profile_steps={self.profile_steps} must be empty or two steps first,last with first < last",
        )

    @property
    def microbatch(self) -> int:
        return self.batch_size // self.grad_accum


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training and validation sequences come from.

    `train` lists corpora written by `lvm pretokenize` (folders or gs:// prefixes), mixed by `weights`;
    `val` is a held-out corpus. With `synthetic` set instead, the trainer writes a synthetic corpus of that
    task into the workdir (tests, tiny curricula): "markov_copy" documents are a block drawn from a fixed sparse
    Markov chain, repeated, so early tokens are learnable from bigrams and later ones by copying.
    """

    train: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()  # one per train corpus; empty: equal weights
    val: str | None = None
    synthetic: str | None = None
    synthetic_docs: int = 256  # documents in the synthetic training corpus (validation: a quarter)
    synthetic_doc_len: int = 1024  # tokens per synthetic document
    synthetic_block: int = 64  # tokens of the repeated block
    seed: int = 0  # shuffle seed
    shuffle_window: int = 8
    overlong: str = "split"
    prefetch: int = 2
    cache_dir: str | None = None  # local cache of gs:// shards (default: a temporary folder)

    def __post_init__(self):
        _positive(
            "data",
            self,
            ("synthetic_docs", "synthetic_doc_len", "synthetic_block", "shuffle_window", "prefetch"),
        )
        _choice("data.overlong", self.overlong, ("split", "drop"))
        if self.synthetic is not None:
            _choice("data.synthetic", self.synthetic, SYNTHETIC_TASKS)
        _require(
            not self.weights or len(self.weights) == len(self.train),
            f"data.weights has {len(self.weights)} values for {len(self.train)} data.train corpora; "
            "give one weight per corpus or none",
        )
        _require(all(w > 0 for w in self.weights), f"data.weights={self.weights} must all be positive")

    def check(self) -> None:
        """The training run needs data: a corpus or a synthetic task."""
        _require(
            bool(self.train) or self.synthetic is not None,
            "no training data: set data.train to corpora made by `lvm pretokenize` "
            "(e.g. data.train=[gs://bucket/corpus]) or data.synthetic=markov_copy",
        )


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole project's configuration, one section per concern."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)

    def __post_init__(self):
        m, tp = self.model, self.mesh.tp
        if tp != -1:
            for name in (
                "n_heads",
                "n_kv_heads",
                "mlp_dim",
                "d_model",
                "text_vocab_size",
                "vision_vocab_size",
            ):
                value = getattr(m, name)
                _require(
                    value % tp == 0,
                    f"model.{name}={value} is not divisible by mesh tp={tp} (tensor parallelism shards it); "
                    f"change mesh.tp or make model.{name} a multiple of {tp}",
                )

    def check_devices(self, n_devices: int) -> MeshConfig:
        """Validate against the device count; returns the resolved mesh."""
        mesh = self.mesh.resolve(n_devices)
        dataclasses.replace(self, mesh=mesh)  # tp checks with -1 resolved
        shards = mesh.fsdp * mesh.sp
        _require(
            self.model.d_model % shards == 0,
            f"model.d_model={self.model.d_model} is not divisible by fsdp*sp={shards} (parameters are "
            "FSDP-sharded over both); change the mesh or d_model",
        )
        return mesh

    def check_batch_shape(self, batch_size: int, seq_len: int, n_devices: int) -> None:
        """Validate a global batch [batch_size, seq_len] against the mesh and the chunk sizes."""
        mesh = self.check_devices(n_devices)
        data = mesh.dp * mesh.fsdp
        _require(
            batch_size % data == 0,
            f"batch size {batch_size} is not divisible by dp*fsdp={data} (the batch is sharded over both); "
            f"use a multiple of {data}",
        )
        try:
            check_layout(self.attention.layout, seq_len, mesh.sp)
            block = seq_len // mesh.sp
            resolve_chunks(
                block, mesh.sp, self.attention.layout, self.attention.q_chunk, self.attention.kv_chunk
            )
        except ValueError as err:
            raise ConfigError(f"{err} (attention.layout / attention.q_chunk / attention.kv_chunk)") from None
        for name in ("ffn_chunk", "loss_chunk"):
            chunk = getattr(self.model, name)
            _require(
                chunk is None or block % chunk == 0,
                f"model.{name}={chunk} must divide the per-device block of {block} tokens (seq_len / sp); "
                f"pick a divisor of {block}",
            )

    def check_training(self, n_devices: int) -> MeshConfig:
        """Everything a training run needs, checked before any compile; returns the resolved mesh."""
        self.data.check()
        t = self.train
        self.check_batch_shape(t.microbatch, t.seq_len, n_devices)
        return self.check_devices(n_devices)


# ----------------------------------------------------------------------------------------------------------
# Loading (the mechanics live in lvm.schema)


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build and validate a Config from nested sections (missing keys take defaults)."""
    return schema.from_dict(Config, data)


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Config:
    """Load YAML files (later ones win) then apply `section.key=value` overrides; validate the result."""
    return schema.load(Config, files, overrides, CONFIG_DIR)


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict (mesh as its "dp,fsdp,tp,sp" string) that `config_from_dict` reads back."""
    lists = lambda v: list(v) if isinstance(v, tuple) else v  # YAML and JSON friendly
    out = {
        f.name: {k: lists(v) for k, v in dataclasses.asdict(getattr(cfg, f.name)).items()}
        for f in dataclasses.fields(cfg)
    }
    out["mesh"] = str(cfg.mesh)
    return out
