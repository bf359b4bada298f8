"""Training metrics: model FLOPs and MFU, and the run's JSONL + TensorBoard writer."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lvm.config import Config

# Peak dense bf16 FLOP/s per device by `device_kind` prefix (vendor figures).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops(device_kind: str, configured: float | None = None) -> float | None:
    """Per-device peak FLOP/s: the configured value, else the table's entry for the device (None: unknown)."""
    if configured:
        return configured
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if device_kind.startswith(prefix):
            return PEAK_FLOPS[prefix]
    return None


def flops_per_token(cfg: Config) -> float:
    """Model FLOPs of one training token (forward + backward): 6 x matmul parameters + causal attention."""
    m, seq = cfg.model, cfg.train.seq_len
    per_layer = m.d_model * m.head_dim * (2 * m.n_heads + 2 * m.n_kv_heads) + 3 * m.d_model * m.mlp_dim
    heads = m.d_model * (m.text_vocab_size + m.vision_vocab_size)
    dense = 6 * (m.n_layers * per_layer + heads)
    attention = 6 * m.n_layers * m.n_heads * m.head_dim * seq  # 12 * L * H * D * S, halved by the causal mask
    return float(dense + attention)


class MetricsWriter:
    """Appends records to `metrics.jsonl` / `eval.jsonl` and scalars to TensorBoard under the run folder."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.workdir = workdir
        self.enabled = enabled
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tb"))

    def write(self, name: str, record: dict) -> None:
        """One JSON line in `{name}.jsonl`; its numeric fields also go to TensorBoard as `{name}/{key}`."""
        if not self.enabled:
            return
        with open(self.workdir / f"{name}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                self._tb.add_scalar(f"{name}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: Path) -> dict[int, dict]:
    """Records of a metrics file by step; a step logged again after a restart keeps its latest record."""
    out = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                out[record["step"]] = record
    return out
