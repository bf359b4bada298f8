"""The demo's data: scene mp4s for the VQGAN, per-stage training manifests and held-out evaluation sets."""

from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lvm.demo import scenes
from lvm.tokenizers.synthetic import write_video

TEXT_CORPUS = Path(__file__).with_name("kjv_genesis.txt")  # public-domain text mixed into training


def write_vqgan_clips(
    folder: Path, n: int, frames: int, needle_frames: int, res: int, seed: int, lights_out: bool
) -> None:
    """Short clips in which the needle is visible for half the frames (the VQGAN must learn its colours); with
    `lights_out` the lights go out before or after it."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i, needle in enumerate(scenes.needles(n, frames, needle_frames, seed)):
        if lights_out:
            needle = scenes.with_lights_out(needle, frames, i % 2 == 0, seed * 1000 + i)
        jobs.append((folder / f"clip{i:03d}.mp4", frames, needle, seed * 1000 + i))
    write_scenes(jobs, res, 4, "videos vqgan")


def write_scenes(jobs: list[tuple[Path, int, scenes.Needle, int]], res: int, fps: int, desc: str) -> None:
    """Render and encode (path, frames, needle, seed) scene videos, one ffmpeg per core at a time. Each file
    appears complete or not at all (written under a temporary name), so an interrupted run resumes safely."""

    def write(job) -> None:
        path, frames, needle, seed = job
        part = path.with_name(path.stem + ".part.mp4")
        write_video(part, scenes.scene(frames, needle, seed, res), fps=fps)
        os.replace(part, path)

    todo = [job for job in jobs if not job[0].exists()]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for _ in tqdm(pool.map(write, todo), total=len(todo), desc=desc, leave=False):
            pass


def write_training_set(
    folder: Path,
    n: int,
    frame_range: tuple[int, int],
    needle_frames: int,
    res: int,
    seed: int,
    fps: int,
    lights_out: bool,
) -> Path:
    """`n` scene videos of log-uniform random length in `frame_range` and a pretokenize manifest asking every
    question, each in two wordings (in random order), about each (with `lights_out`, the order question where
    the clip has room for the lights to go out); returns the manifest's path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    low, high = np.log(frame_range[0]), np.log(frame_range[1] + 1)
    lengths = np.exp(rng.uniform(low, high, n)).astype(int)  # log-uniform: many short clips, some long
    lines, jobs = [], []
    for i in range(n):
        needle = scenes.needles(1, int(lengths[i]), needle_frames, seed * 100_003 + i)[0]
        needle = _balanced(needle, i)
        if lights_out:
            needle = scenes.with_lights_out(needle, int(lengths[i]), (i // 4) % 2 == 0, seed + i)
        path = folder / f"v{i:04d}.mp4"
        jobs.append((path, int(lengths[i]), needle, seed * 100_003 + i))
        kinds = scenes.kinds(needle.lights_out is not None)
        turns = [(q, k) for k in kinds for q in (scenes.QUESTIONS[k][0], scenes.REPHRASED[k])]
        qa = [{"question": q, "answer": f"{scenes.answer(needle, k).capitalize()}."}
              for q, k in (turns[j] for j in rng.permutation(len(turns)))]  # fmt: skip
        lines.append({"video": path.name, "qa": qa, "id": f"{folder.name}/{i}"})
    write_scenes(jobs, res, fps, f"videos {folder.parent.name}/{folder.name}")
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest


def _balanced(needle: scenes.Needle, i: int) -> scenes.Needle:
    """Colours and shapes cycle with the index so every answer is equally common."""
    colours, shapes = list(scenes.COLOURS), scenes.SHAPES
    return dataclasses.replace(needle, colour=colours[i % 4], shape=shapes[(i // 4 + i) % 4])


def write_eval_set(
    folder: Path, n: int, frames: int, needle_frames: int, res: int, seed: int, fps: int, lights_out: bool
) -> Path:
    """`n` held-out videos of `frames` frames with needles at stratified depths (with `lights_out`, half of them
    before the lights go out and half after); returns `eval.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    needles = scenes.needles(n, frames, needle_frames, seed)
    if lights_out:
        needles = scenes.with_balanced_lights_out(needles, frames, seed)
    items, jobs = [], []
    for i, needle in enumerate(needles):
        path = folder / f"e{i:04d}.mp4"
        jobs.append((path, frames, needle, seed * 7919 + i))
        depth = needle.start / max(frames - needle_frames, 1)
        items.append({"video": str(path.resolve()), "start": needle.start, "frames": frames, "depth": depth,
                      "lights_out": needle.lights_out,
                      **{k: scenes.answer(needle, k) for k in scenes.kinds(needle.lights_out is not None)}})  # fmt: skip
    write_scenes(jobs, res, fps, f"held-out {folder.parent.name}")
    out = folder / "eval.json"
    out.write_text(json.dumps(items, indent=1))
    return out


def write_text_manifest(folder: Path, lines_per_doc: int = 8) -> Path:
    """The text corpus as pretokenize `{"text": ...}` documents."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [ln for ln in TEXT_CORPUS.read_text().splitlines() if ln.strip()]
    docs = [" ".join(lines[i : i + lines_per_doc]) for i in range(0, len(lines), lines_per_doc)]
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return manifest


def tokenizer_text(path: Path, lights_out: bool) -> Path:
    """SentencePiece training text: the corpus plus every question asked (the order question only with
    `lights_out`), answer and the chat template words."""
    from lvm.tokenizers.format import template_words

    extra = [template_words()]
    for kind in scenes.kinds(lights_out):
        question, _ = scenes.QUESTIONS[kind]
        extra += [question, scenes.REPHRASED[kind], *scenes.options_text(kind)]
    path.write_text(TEXT_CORPUS.read_text() + "\n" + "\n".join(extra * 50) + "\n")
    return path
