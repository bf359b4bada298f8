"""`lvm qa`, `lvm generate` and the inference API end to end, on the model of `qa_assets.trained`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from qa_assets import QUESTION, trained  # noqa: F401  (fixture)

pytestmark = [pytest.mark.xdist_group("qa"), pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")]
REPO = Path(__file__).resolve().parent.parent


def lvm(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    return subprocess.run(
        [sys.executable, "-m", "lvm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


def test_qa_answers_about_a_real_mp4(trained):  # noqa: F811
    for colour in ("red", "blue"):
        out = lvm("qa", "--checkpoint", str(trained / "export"), "--video", str(trained / f"held_out_{colour}.mp4"),
                  "--question", QUESTION, "--max-new-tokens", "8")  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip().splitlines()[-1] == f"{colour.capitalize()}.", out.stdout
        assert "frames" in out.stderr  # the video's size and the streamed answer go to stderr
