"""The README's `lvm ...` command lines, run as a new user would on a plain machine: in a fresh folder, in a fresh
process with no XLA device-count flags, one after another (later commands read what earlier ones wrote).

Every command line in the README's ```bash blocks is classified here: run (the cheap ones; training commands get
a step-count override so the test stays short) or skipped with the reason. A new README command fails the test
until it is classified."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"

QUICK = ["--set", "train.steps=2", "--no-progress"]
MY_TRAIN_YAML = """\
train: {steps: 2, seq_len: 256, batch_size: 8, checkpoint_every: 2}
data: {synthetic: markov_copy, synthetic_docs: 32, synthetic_doc_len: 257}
"""
# command prefix -> (extra arguments, expected exit code, text stderr must contain) for the commands that run
RUN = {
    "lvm train --config tiny --stage 1k": (QUICK, 0, None),
    "lvm train --config model/tiny --config my_train.yaml": (["--no-progress"], 0, None),
    "lvm curriculum --config tiny": (QUICK, 0, None),
    "lvm export --workdir runs/tiny/stages/4k --out runs/tiny_export": ([], 0, None),
    "lvm export --workdir runs/tiny/stages/4k --out runs/model": ([], 0, None),
    # the tiny curriculum trains on synthetic token data: no tokenizer is recorded, and qa says which flag to add
    "lvm qa --checkpoint runs/model --video clip.mp4": ([], 2, "--text-tokenizer"),
    "lvm export-hf --checkpoint runs/model": ([], 0, None),
}
SKIP = {
    "lvm plan --config lwm_text": "compiles a 7B model's 1M-token step (minutes); tests/training/test_plan.py plans",
    "lvm qa --checkpoint runs/model --video gs://": "needs a video in a bucket; tests/inference/test_qa.py",
    "lvm generate": "needs a model with a VQGAN; tests/inference/test_qa.py generates",
    "lvm eval-qa": "needs a benchmark's videos; tests/inference/test_evals.py",
    "lvm eval-needle": "needs a model with tokenizers; tests/inference/test_evals.py",
    "lvm convert-lwm": "needs LWM's released files; tests/interop/test_interop.py converts generated ones",
    "lvm chat": "serves until stopped; tests/end_to_end/test_chat_browser.py drives it in Chromium",
    "lvm pretokenize --manifest runs/own-videos": "needs your videos; tests/end_to_end/test_own_videos.py",
    "lvm train --config runs/demo/export/config.yaml": "needs the demo's model; test_own_videos.py fine-tunes",
    "lvm export --workdir runs/own-videos/finetune": "needs the fine-tuned run; test_own_videos.py exports",
}


def readme_commands() -> list[str]:
    """The `lvm ...` lines of the README's bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    lines = [shlex.split(line, comments=True) for line in text.splitlines()]
    return [shlex.join(words) for words in lines if words and words[0] == "lvm"]


def plain_env() -> dict[str, str]:
    """This environment without the tests' simulated-device settings (the persistent compile cache stays)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return env | {"PYTHONPATH": os.pathsep.join(sys.path)}


def test_every_readme_command_is_classified():
    for command in readme_commands():
        matches = [p for p in (*RUN, *SKIP) if command.startswith(p)]
        assert len(matches) == 1, f"classify this README command in {__file__}: {command}"


@pytest.mark.slow
@pytest.mark.xdist_group("training_runs")
def test_cheap_readme_commands_run_as_written(tmp_path):
    (tmp_path / "my_train.yaml").write_text(MY_TRAIN_YAML)
    ran = []
    for command in readme_commands():
        prefix = next((p for p in RUN if command.startswith(p)), None)
        if prefix is None:
            continue
        extra, code, message = RUN[prefix]
        argv = [sys.executable, "-m", "lvm.cli", *shlex.split(command)[1:], *extra]
        done = subprocess.run(
            argv, cwd=tmp_path, env=plain_env(), capture_output=True, text=True, timeout=600
        )
        assert done.returncode == code, f"{command}\n{done.stderr[-3000:]}"
        if message:
            assert message in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
        ran.append(prefix)
    assert sorted(ran) == sorted(RUN)  # every cheap command is still in the README
    assert (tmp_path / "runs" / "model-hf" / "model.safetensors").is_file()
