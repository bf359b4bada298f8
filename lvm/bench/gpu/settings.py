"""What the GPU check measures: the sizes of a real run (FULL) and of a smoke run (SMOKE), the section budgets,
and the thresholds of its targets."""

from __future__ import annotations

import dataclasses

SECTIONS = ("matmul", "attention", "train", "vqgan_encode", "max_context")
IMPLS = ("cudnn", "fused", "xla")  # run order at each length and mask: cuDNN first, it is the reference
FUSED_VS_CUDNN = 0.8  # target: fused fwd+bwd FLOP/s at 32K causal over cuDNN's
MFU_TARGET = 0.40  # target: MFU of the 1B step at 32K
GRAD_TOLERANCE = 3e-2  # max |g - g_cudnn| / max |g_cudnn| for bf16, as in tests/test_attention.py
USABLE_MEMORY = 0.95  # a step "fits" when XLA's peak is at most this fraction of the device's memory limit


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
    vqgan_config: str  # configs/vqgan/NAME.yaml of the vqgan_encode section
    vqgan_batches: tuple[int, ...]  # frames per encode call
    decode_clip: str  # WxH of the h264 clip the decode workers read
    decode_clip_seconds: float
    decode_fps: float  # sampling rate (pretokenize's default: 1)
    decode_videos_per_worker: int  # copies of the clip read per worker
    decode_estimate_s: float  # time the decode half needs (clip, worker start-up, decoding)


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
    budgets={"matmul": 15, "attention": 140, "train": 80, "vqgan_encode": 40, "max_context": 55},
    deadline_s=330,
    default_compile_s=15,
    vqgan_config="default",
    vqgan_batches=(8, 64),
    decode_clip="1280x720",
    decode_clip_seconds=20,
    decode_fps=1.0,
    decode_videos_per_worker=2,
    decode_estimate_s=20,
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
    budgets={"matmul": 30, "attention": 120, "train": 120, "vqgan_encode": 90, "max_context": 120},
    deadline_s=600,
    default_compile_s=5,
    vqgan_config="tiny",
    vqgan_batches=(8,),
    decode_clip="160x120",
    decode_clip_seconds=2,
    decode_fps=3.0,
    decode_videos_per_worker=1,
    decode_estimate_s=20,
)


def settings_from_args(args) -> Settings:
    """FULL or SMOKE with the budgets (--budget SECTION=SECONDS) and the deadline given on the command line."""
    s = SMOKE if args.smoke else FULL
    budgets = dict(s.budgets)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in budgets or not seconds:
            raise ValueError(f"--budget {item!r}: write SECTION=SECONDS with SECTION one of {SECTIONS}")
        budgets[name] = float(seconds)
    return dataclasses.replace(s, budgets=budgets, deadline_s=args.deadline or s.deadline_s)
