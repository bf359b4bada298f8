"""Shared test assets for inference tests: real mp4s (ffmpeg), an untrained tiny VQGAN, a SentencePiece model,
`lvm pretokenize`, and a tiny model trained to tell red videos from blue ones (`trained` fixture)."""

import json

import numpy as np
import pytest

from lvm.cli import run_command
from lvm.demo.corpus import TEXT_CORPUS
from lvm.tokenizers import synthetic, text
from lvm.tokenizers.config import load_config as load_vqgan_config
from lvm.tokenizers.vqgan import init_variables, save_model

COLOURS = {"Red": (220, 30, 30), "Blue": (30, 30, 220)}
QUESTION = "What colour is the video?"


def colour_video(path, rgb, seed, frames=6):
    rng = np.random.default_rng(seed)
    base = np.array(rgb, np.int16)[None, None, None] + rng.integers(-20, 20, (frames, 32, 32, 3))
    synthetic.write_video(path, np.clip(base, 0, 255).astype(np.uint8), fps=4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on red / blue video QA; returns (export folder, workdir, a held-out red video)."""
    root = tmp_path_factory.mktemp("qa")
    cfg = load_vqgan_config("tiny", ["model.resolution=32", "model.channel_mult=1,2,2"])  # 8x8 codes
    save_model(cfg, init_variables(cfg.model), root / "vqgan")
    tok = text.train(TEXT_CORPUS, 400, root / "sp")
    lines = []
    for i in range(16):
        name = list(COLOURS)[i % 2]
        colour_video(root / f"v{i}.mp4", COLOURS[name], seed=i)
        lines.append({"video": f"v{i}.mp4", "qa": [{"question": QUESTION, "answer": f"{name}."}]})
        lines.append({"video": f"v{i}.mp4", "prompt": f"a {name.lower()} video"})  # text to video
    (root / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    run_command("pretokenize", ["--manifest", str(root / "manifest.jsonl"), "--output", str(root / "corpus"),
                                "--vqgan", str(root / "vqgan"), "--text-tokenizer", tok.model_file,
                                "--num-frames", "2", "--uncond-prob", "0.25", "--no-progress"])  # fmt: skip
    sets = ["mesh=1,8,1,1", "train.seq_len=256", "train.batch_size=8", "train.steps=100", "train.lr=1e-2",
            "train.warmup_steps=5", f"data.train=[{root / 'corpus'}]", "train.checkpoint_every=100"]  # fmt: skip
    argv = ["--config", "model/tiny", "--workdir", str(root / "run"), "--no-progress"]
    assert run_command("train", [*argv, *[a for s in sets for a in ("--set", s)]]) == 0
    run_command("export", ["--workdir", str(root / "run"), "--out", str(root / "export")])
    colour_video(root / "held_out_red.mp4", COLOURS["Red"], seed=100)
    colour_video(root / "held_out_blue.mp4", COLOURS["Blue"], seed=101)
    return root
