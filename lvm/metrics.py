"""Training metrics: model FLOPs and MFU, and the run's log files (JSONL records, TensorBoard events, profiler
traces), kept in the run folder, local or `gs://`.

A local run folder is written in place: one line appended per record. An object store has no append, so for a
`gs://` folder the files are kept in a local staging folder and each changed file is uploaded as one whole object
(atomically: a reader sees the previous upload or this one) at every `flush()`: the trainer flushes before it
starts each checkpoint and at the end, and `write()` flushes every `FLUSH_S` seconds. The records of every step
up to a complete checkpoint are therefore in the bucket before that checkpoint can complete (an upload that
fails after its retries is reported and made again at the next flush); a run that starts
again reads the files back and drops the records of steps after the step it resumes from (they are trained and
logged again), so after any kill the files hold each step once.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time

from lvm.config import Config
from lvm.data_pipeline import storage

FLUSH_S = 60.0  # a gs:// run folder's log files are uploaded at least this often while records come in
LOGS = ("metrics", "eval")  # the JSONL files: {name}.jsonl

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
    """Records to `metrics.jsonl` / `eval.jsonl` and scalars to TensorBoard (`tb/`) in the run folder `workdir`
    (a local path or gs:// URI), when `enabled` (process 0); on every process, `local_dir(name)` is a folder
    whose files land under `workdir/name` (profiler traces)."""

    def __init__(self, workdir: str, enabled: bool = True, clock=time.monotonic):
        self.workdir = str(workdir)
        self.enabled = enabled
        self.remote = storage.is_gcs(self.workdir)
        self.staging = tempfile.mkdtemp(prefix="lvm-run-") if self.remote else self.workdir
        self.clock = clock
        self._flushed = clock()
        self._uploaded: dict[str, tuple[int, int]] = {}  # staged file -> (size, mtime) when last uploaded
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self.local_dir("tb"))

    def local_dir(self, name: str) -> str:
        """The local folder whose files end up under `workdir/name` (the next `flush` uploads them)."""
        path = os.path.join(self.staging, name)
        os.makedirs(path, exist_ok=True)
        return path

    def resume(self, step: int) -> None:
        """Start from `step`: the JSONL files keep the records of steps up to `step` and drop later ones."""
        if not self.enabled:
            return
        self.flush()
        for name in LOGS:
            lines = _lines(storage.join(self.workdir, f"{name}.jsonl"))
            kept = [line for line in lines if json.loads(line)["step"] <= step]
            local = os.path.join(self.staging, f"{name}.jsonl")
            if (self.remote or len(kept) < len(lines)) and (kept or os.path.exists(local)):
                storage.write_bytes(local, "".join(line + "\n" for line in kept).encode())

    def write(self, name: str, record: dict) -> None:
        """One JSON line in `{name}.jsonl`; its numeric fields also go to TensorBoard as `{name}/{key}`."""
        if not self.enabled:
            return
        with open(os.path.join(self.staging, f"{name}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                self._tb.add_scalar(f"{name}/{key}", value, step)
        if self.remote and self.clock() - self._flushed >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Upload every staged file that changed since its last upload, each as one whole object (gs://).
        A failed upload is reported and tried again at the next flush (the staged file keeps everything)."""
        if self._tb is not None:
            self._tb.flush()
        self._flushed = self.clock()
        if not self.remote:
            return
        for root, _, files in os.walk(self.staging):
            for file in sorted(files):
                path = os.path.join(root, file)
                stat = os.stat(path)
                if self._uploaded.get(path) == (stat.st_size, stat.st_mtime_ns):
                    continue
                rel = os.path.relpath(path, self.staging).replace(os.sep, "/")
                try:
                    with open(path, "rb") as f:
                        storage.write_bytes(storage.join(self.workdir, rel), f.read())
                except OSError as err:  # StorageError after its retries: keep training, try again later
                    print(
                        f"lvm train: warning: could not upload {rel} ({err}); retrying later", file=sys.stderr
                    )
                    continue
                self._uploaded[path] = (stat.st_size, stat.st_mtime_ns)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.flush()
        if self.remote:
            shutil.rmtree(self.staging, ignore_errors=True)


def _lines(uri: str) -> list[str]:
    """The complete JSON lines of a JSONL file (none when it is missing; a torn last line is dropped)."""
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        return []
    lines = []
    for line in text.splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            continue
        lines.append(line)
    return lines


def read_jsonl(path: str | os.PathLike) -> dict[int, dict]:
    """Records of a metrics file (local or gs://) by step; a step logged again after a restart keeps its
    latest record."""
    out = {}
    for line in _lines(os.fspath(path)):
        record = json.loads(line)
        out[record["step"]] = record
    return out
