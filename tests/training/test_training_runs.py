"""Whole training runs as a user starts them (`lvm train`, `lvm curriculum` in subprocesses): kill -9 during a
step and during a checkpoint write, SIGTERM, and the tiny curriculum end to end."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lvm import cpu_devices
from lvm.config import config_from_dict
from lvm.metrics import read_jsonl

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("training_runs"),
]  # subprocess-heavy: one worker in turn

REPO = Path(__file__).resolve().parents[2]
ENV = cpu_devices.cpu_env(8)  # JAX_COMPILATION_CACHE_DIR etc. come from conftest.py's settings
TRAIN = ["--config", "tiny", "--stage", "1k", "--no-progress"]
SETS = ["train.steps=12", "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.seq_len=512"]
SETS += ["data.synthetic_doc_len=513", "data.synthetic_docs=128"]


def lvm(*args) -> list[str]:
    return [sys.executable, "-m", "lvm.cli", *args]


def train_cmd(workdir, *extra) -> list[str]:
    sets = [a for s in [*SETS, *extra] for a in ("--set", s)]
    return lvm("train", *TRAIN, *sets, "--workdir", str(workdir))


def run(cmd, timeout=300) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return out


def run_until(cmd, ready, timeout=180, sig=signal.SIGKILL) -> int:
    """Start `cmd`, poll `ready()` every 0.5 ms, then send `sig`; returns the exit code."""
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.time()
        while not ready():
            assert proc.poll() is None, (
                f"run ended before the interruption point: {proc.stderr.read()[-3000:]}"
            )
            assert time.time() - t0 < timeout, "interruption point never reached"
            time.sleep(0.0005)
        proc.send_signal(sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()


def losses(workdir) -> dict[int, float]:
    return {step: r["loss"] for step, r in read_jsonl(Path(workdir) / "metrics.jsonl").items()}


def logged_steps(workdir) -> int:
    path = Path(workdir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def writing(workdir, step: int):
    """True while Orbax is writing checkpoint `step` (its temporary folder exists)."""
    ckpt = Path(workdir) / "checkpoints"
    return lambda: (
        ckpt.is_dir() and any(p.name.startswith(f"{step}.orbax-checkpoint-tmp") for p in ckpt.iterdir())
    )


def complete_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def test_kill_during_a_step_and_during_a_checkpoint_write_then_resume_exactly(tmp_path):
    reference = tmp_path / "reference"
    out = run(train_cmd(reference))
    assert out.returncode == 0, out.stderr[-3000:]
    expected = losses(reference)
    assert sorted(expected) == list(range(1, 13))

    workdir = tmp_path / "interrupted"
    # 1. kill -9 in the middle of training (after step 5 was logged)
    assert run_until(train_cmd(workdir), lambda: logged_steps(workdir) >= 5) == -signal.SIGKILL
    # 2. rerun; kill -9 while checkpoint 8 is being written
    assert run_until(train_cmd(workdir), writing(workdir, 8)) == -signal.SIGKILL
    assert writing(workdir, 8)(), "the partial checkpoint should still be on disk"
    assert 8 not in complete_steps(workdir)
    # 3. rerun to the end: it resumes from the newest complete checkpoint, never the partial one
    out = run(train_cmd(workdir))
    assert out.returncode == 0, out.stderr[-3000:]
    starts = [s["step"] for s in json.loads((workdir / "run.json").read_text())["starts"]]
    # each start resumes from the newest COMPLETE checkpoint (the one being written when killed does not count)
    assert starts[0] == 0 and starts[1] in (2, 4) and starts[2] in (4, 6), starts
    got = losses(workdir)
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"
    assert not writing(workdir, 8)(), "the partial checkpoint was not cleaned up"


def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes(tmp_path):
    workdir = tmp_path / "run"
    code = run_until(
        train_cmd(workdir, "train.checkpoint_every=100"),
        lambda: logged_steps(workdir) >= 3,
        sig=signal.SIGTERM,
    )
    assert code == 143
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["preempted"] and summary["checkpoint_step"] == summary["steps"] >= 3
    assert complete_steps(workdir) == [summary["steps"]]
    out = run(train_cmd(workdir, "train.checkpoint_every=100"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 12


def test_tiny_curriculum_end_to_end_then_rerun_skips_finished_stages(tmp_path):
    cmd = lvm("curriculum", "--config", "tiny", "--workdir", str(tmp_path), "--no-progress")
    out = run(cmd, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["complete"] and list(summary["stages"]) == ["1k", "2k", "4k"]
    assert "final loss" in out.stdout  # the table
    previous_final = None
    for name, seq, sp, theta in (("1k", 1024, 1, 1e4), ("2k", 2048, 2, 4e4), ("4k", 4096, 4, 1.6e5)):
        stage = summary["stages"][name]
        stage_dir = Path(stage["workdir"])
        cfg = config_from_dict(yaml.safe_load((stage_dir / "config.yaml").read_text()))
        assert (cfg.train.seq_len, cfg.mesh.sp, cfg.model.rope_theta) == (seq, sp, theta)
        assert stage["steps"] > 0 and stage["tokens"] == stage["steps"] * seq * (8192 // seq)
        curve = [r["loss"] for _, r in sorted(read_jsonl(stage_dir / "metrics.jsonl").items())]
        assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, f"stage {name}: loss did not decrease: {curve}"
        if previous_final is not None:  # starts from the previous stage's params, not from scratch
            assert curve[0] < 6.0, f"stage {name} starts at loss {curve[0]} (fresh init is ln 512 = 6.24)"
        previous_final = curve[-1]
    out = run(cmd, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("already finished, skipped") == 3
