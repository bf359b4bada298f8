"""Pre-tokenization: a JSONL manifest of videos with text and of plain-text documents -> token shards.

Manifest lines (one JSON object each; relative video paths are relative to the manifest's folder or prefix):

    {"text": "..."}                                                  a text document (every token a target)
    {"video": "clip.mp4", "caption": "..."}                          <s><vision>..</vision>caption</s>
    {"video": "gs://b/v.mp4", "qa": [{"question": "..", "answer": ".."}, ...]}   chat, answers are targets
    {"video": "clip.mp4", "prompt": "..."}                           <s>prompt<vision>..</vision></s>: text to video,
                                                                     the video is the target
    optional: "id" (default: the line number), "video_loss" (weight of the video's tokens, default --video-loss)

For classifier-free guidance, a text-to-video example drops its prompt (becoming unconditional,
`<s><vision>..</vision></s>`) with probability `uncond_prob`, decided by a seeded draw per manifest line.

Chat documents are `format.conversation`s: the first turn in the video-first template (or LWM's question-first
one with template "lwm"), later turns as `format.later_turn`.

Manifest line i goes to shard i // shard_size; shard k is made by process k % process_count. Finished shards
(their index exists) are skipped, so a rerun after a crash redoes only unfinished shards. An input that fails
(bad manifest line, missing/corrupt/audio-only video, ...) is left out of its shard and recorded in the shard's
index and in the error log beside the shards: `errors.jsonl` (or `errors-{i:05d}-of-{n:05d}.jsonl` per process
when several processes share the output), one line {"shard", "line", "id", "video", "error"} per failure.

Videos are decoded by `decode_workers` processes (`decode.DecodePool`; default: one per CPU but one) ahead of the
encoder, a long video in segments by several at once; the frames reach the VQGAN in order, in the chunks one worker
would give, so the shards are byte-identical whatever the worker count. A file that crashes or hangs its worker
(`decode_timeout_s`) is recorded as failed and the worker replaced.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from lvm.data_pipeline import shards, storage
from lvm.data_pipeline.decode import DecodeConfig, DecodeError, DecodePool
from lvm.tokenizers import format as fmt


@dataclasses.dataclass
class PretokenizeConfig:
    manifest: str
    output: str
    vqgan: str | None = None  # VQGAN workdir; needed only when the manifest has videos
    text_tokenizer: str = ""
    decode: DecodeConfig = DecodeConfig()  # resolution is taken from the VQGAN
    shard_size: int = 256  # manifest lines per shard
    process_index: int = 0
    process_count: int = 1
    template: str = "video_first"  # a key of format.TEMPLATES
    video_loss: float = 0.0
    uncond_prob: float = 0.0  # share of text-to-video examples whose prompt is dropped (for guidance)
    cache_dir: str | None = None
    cache_bytes: int = 8 << 30
    decode_timeout_s: float = 600.0
    decode_workers: int | None = None  # decode worker processes (None: `decode.default_decode_workers()`)
    decode_frames_in_flight: int | None = None  # frames decoded ahead at most (None: the pool's default)
    progress: bool = True

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(
                f"need 0 <= process_index < process_count, got {self.process_index}, {self.process_count}"
            )
        for name in ("decode_workers", "decode_frames_in_flight"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None: the default), got {value}")
        if not 0 <= self.uncond_prob <= 1:
            raise ValueError(f"uncond_prob must lie in [0, 1], got {self.uncond_prob}")
        if self.template not in fmt.TEMPLATES:
            names = " or ".join(map(repr, fmt.TEMPLATES))
            raise ValueError(f"template must be {names}, got {self.template!r}")


def read_manifest(uri: str) -> list[str]:
    """The manifest's lines (blank lines and lines starting with '#' become empty strings, keeping numbering)."""
    lines = storage.read_text(uri).splitlines()
    return ["" if not ln.strip() or ln.lstrip().startswith("#") else ln for ln in lines]


def resolve(video: str, manifest: str) -> str:
    if storage.is_gcs(video) or os.path.isabs(video):
        return video
    return storage.join(storage.dirname(manifest), video)


def drops_prompt(line_no: int, uncond_prob: float) -> bool:
    """Whether manifest line `line_no`'s text-to-video prompt is dropped (seeded by the line, so reruns agree)."""
    return uncond_prob > 0 and np.random.default_rng([7, line_no]).random() < uncond_prob


def document(
    example: dict[str, Any],
    codes: np.ndarray | None,
    template: str,
    video_loss: float,
    drop_prompt: bool = False,
) -> fmt.Document:
    """The token document of one manifest example (`codes` `[T, h, w]` for a video example)."""
    if "video" not in example:
        text = example.get("text")
        if not isinstance(text, str) or not text:
            raise ValueError("a line needs a non-empty 'text' or a 'video'")
        return fmt.Document((fmt.Text(text, 1.0),), bos=True, eos=True)
    if "prompt" in example:
        prompt = example["prompt"]
        if not isinstance(prompt, str):
            raise ValueError("'prompt' must be a string")
        segments = (fmt.Text("" if drop_prompt else prompt), fmt.Video(codes, 1.0))
        return fmt.Document(segments, bos=True, eos=True)
    video = fmt.Video(codes, float(example.get("video_loss", video_loss)))
    if "qa" in example:
        turns = example["qa"]
        if not turns or not all(isinstance(t, dict) and "question" in t and "answer" in t for t in turns):
            raise ValueError("'qa' must be a non-empty list of {'question', 'answer'}")
        return fmt.conversation(video, [(t["question"], t["answer"]) for t in turns], template=template)
    caption = example.get("caption")
    if not isinstance(caption, str) or not caption:
        raise ValueError("a video line needs a 'caption' or 'qa'")
    return fmt.Document((video, fmt.Text(caption, 1.0)), bos=True, eos=True)


class _Progress:
    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="ex", disable=not enabled, desc="pretokenize")
        self.frames = 0
        self.t0 = time.perf_counter()

    def add_frames(self, n: int) -> None:
        self.frames += n
        rate = self.frames / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix(frames=self.frames, frames_per_s=f"{rate:.1f}")

    def close(self) -> None:
        self.bar.close()


def run(cfg: PretokenizeConfig) -> dict[str, Any]:
    """Make this process's unfinished shards; returns a summary (counts, failures, frames/s)."""
    from lvm.tokenizers.text import SentencePieceTokenizer

    lines = read_manifest(cfg.manifest)
    n_shards = max(1, -(-len(lines) // cfg.shard_size))
    has_video = any('"video"' in ln for ln in lines)
    codec = SentencePieceTokenizer(cfg.text_tokenizer)
    tokenizer, vocab, decode_cfg = None, fmt.VisionVocab(), cfg.decode
    if has_video:
        if not cfg.vqgan:
            raise ValueError("the manifest has videos: give --vqgan (a `lvm train-vqgan` workdir)")
        from lvm.tokenizers.vqgan import VQGANTokenizer

        tokenizer = VQGANTokenizer.load(cfg.vqgan)
        vocab = fmt.VisionVocab(n_codes=tokenizer.cfg.codebook_size)
        chunk = tokenizer.max_frames_per_device * len(tokenizer.devices)
        decode_cfg = dataclasses.replace(cfg.decode, resolution=tokenizer.cfg.resolution, chunk_frames=chunk)

    storage.makedirs(cfg.output)
    header = {
        "format": shards.FORMAT,
        "num_shards": n_shards,
        "shard_size": cfg.shard_size,
        "manifest": cfg.manifest,
        "manifest_lines": len(lines),
        "text_tokenizer": os.path.abspath(cfg.text_tokenizer),
        "vqgan": os.path.abspath(cfg.vqgan) if cfg.vqgan else None,
        "text_vocab_size": codec.vocab_size,
        "vision_n_codes": vocab.n_codes,
        "vision_vocab_size": vocab.size,
        "code_shape": list(tokenizer.code_shape) if tokenizer else None,
        "decode": dataclasses.asdict(decode_cfg),
        "template": cfg.template,
    }
    header_uri = storage.join(cfg.output, shards.HEADER)
    if storage.exists(header_uri):
        old = json.loads(storage.read_text(header_uri))
        if old.get("num_shards") != n_shards or old.get("shard_size") != cfg.shard_size:
            raise ValueError(
                f"{cfg.output} holds a corpus of {old.get('num_shards')} shards of {old.get('shard_size')} lines; "
                f"this run makes {n_shards} of {cfg.shard_size}: use a new --output or the old --shard-size"
            )
    else:
        storage.write_json(header_uri, header)

    mine = [k for k in range(n_shards) if k % cfg.process_count == cfg.process_index]
    present = set(storage.listdir(cfg.output))
    done = {k for k in mine if shards.shard_name(k, n_shards) + ".json" in present}
    errors_name = (
        "errors.jsonl"
        if cfg.process_count == 1
        else f"errors-{cfg.process_index:05d}-of-{cfg.process_count:05d}.jsonl"
    )
    errors_uri = storage.join(cfg.output, errors_name)
    errors = []
    if storage.exists(errors_uri):  # keep the failures of shards finished by earlier runs
        errors = [
            e for e in map(json.loads, storage.read_text(errors_uri).splitlines()) if e["shard"] in done
        ]

    todo = [k for k in mine if k not in done]
    total = sum(len(lines[k * cfg.shard_size : (k + 1) * cfg.shard_size]) for k in todo)
    progress = _Progress(total, cfg.progress)
    cache = storage.FileCache(
        cfg.cache_dir or tempfile.mkdtemp(prefix="lvm-pretokenize-"), max_bytes=cfg.cache_bytes
    )
    records_written = tokens_written = frames_total = 0
    t0 = time.perf_counter()
    pool = DecodePool(
        decode_cfg,
        workers=cfg.decode_workers,
        frames_in_flight=cfg.decode_frames_in_flight,
        cache=cache,
        timeout_s=cfg.decode_timeout_s,
    )
    with pool:
        pool.schedule(_videos(lines, todo, cfg))  # decoded ahead, in the order they are read
        for k in todo:
            records, ids, failures = [], [], []
            for line_no in range(k * cfg.shard_size, min((k + 1) * cfg.shard_size, len(lines))):
                line = lines[line_no]
                progress.bar.update(1)
                if not line:
                    continue
                example: dict[str, Any] = {}
                try:
                    example = json.loads(line)
                    if not isinstance(example, dict):
                        raise ValueError("a manifest line must be a JSON object")
                    codes = None
                    if "video" in example:
                        uri = resolve(example["video"], cfg.manifest)
                        codes = _encode_video(pool, tokenizer, uri, progress)
                        frames_total += len(codes)
                    drop = drops_prompt(line_no, cfg.uncond_prob)
                    doc = document(example, codes, cfg.template, cfg.video_loss, drop)
                    record = fmt.build(doc, codec, vocab)
                except (DecodeError, ValueError, KeyError, TypeError) as err:
                    reason = str(err) if isinstance(err, DecodeError) else f"{type(err).__name__}: {err}"
                    failures.append(
                        {
                            "shard": k,
                            "line": line_no,
                            "id": str(example.get("id", line_no)),
                            "video": example.get("video"),
                            "error": reason,
                        }
                    )
                    continue
                records.append(record)
                ids.append(str(example.get("id", line_no)))
            shards.write_shard(cfg.output, k, n_shards, records, ids, vocab, failures)
            records_written += len(records)
            tokens_written += sum(len(r) for r in records)
            errors += failures
            storage.write_bytes(errors_uri, "".join(json.dumps(e) + "\n" for e in errors).encode())
    progress.close()
    elapsed = time.perf_counter() - t0
    return {
        "output": cfg.output,
        "shards": n_shards,
        "shards_made": len(todo),
        "shards_skipped": len(done),
        "records": records_written,
        "tokens": tokens_written,
        "frames": frames_total,
        "frames_per_s": frames_total / elapsed if elapsed > 0 else None,
        "failed": len([e for e in errors if e["shard"] in todo]),
        "decode_workers": pool.workers,
        "decode_restarts": pool.restarts,
        "errors_file": errors_uri,
        "seconds": elapsed,
    }


def _videos(lines: list[str], todo: list[int], cfg: PretokenizeConfig) -> list[str]:
    """The videos of the lines this run makes, in the order it reads them (the pool decodes them ahead)."""
    order = []
    for k in todo:
        for line_no in range(k * cfg.shard_size, min((k + 1) * cfg.shard_size, len(lines))):
            try:
                order.append(resolve(json.loads(lines[line_no])["video"], cfg.manifest))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # no video (a bad line is reported when it is read)
    return order


def _encode_video(pool: DecodePool, tokenizer, uri: str, progress: _Progress) -> np.ndarray:
    """VQGAN codes `[T, h, w]` of a video, chunk by chunk in order (frames never all in memory)."""
    codes = []
    for chunk in pool.frames(uri):
        codes.append(tokenizer.encode(chunk.frames))
        progress.add_frames(len(chunk.frames))
    if not codes:
        raise DecodeError("no frames sampled")
    return np.concatenate(codes)
