"""Training on a gs:// workdir, against a real GCS API server on loopback (conftest's `gcs_server`): every file a
run writes lands in the bucket; the log files survive kills without losing or repeating a step; kill -9 during a
step and during a checkpoint write, then a server restart mid-run (which costs retries, not the run), end with
the losses of an uninterrupted run; two processes train, agree on time-based checkpoints and resume together;
`lvm export`, `load_model` and `export_hf` read gs://. The subprocess runs reuse test_training_runs.py's and
test_multihost.py's settings and helpers, pointed at the bucket."""

import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest
import test_multihost
import test_training_runs as runs
from conftest import make_mesh
from test_trainer import stage_cfg

from lvm import checkpoint
from lvm.data_pipeline import storage
from lvm.metrics import MetricsWriter, read_jsonl
from lvm.trainer import train

pytestmark = pytest.mark.xdist_group("training_runs")  # one worker in turn: the subprocess runs are heavy

BUCKET = "test"  # the bucket conftest's server holds


@pytest.fixture(scope="module")
def gcs(gcs_server):
    """The server, with test_training_runs' subprocesses pointed at it the way a user would: only
    STORAGE_EMULATOR_HOST (lvm.checkpoint points Orbax's clients there; the variables it sets here go after)."""
    orbax_env = {key: os.environ.get(key) for key in ("TENSORSTORE_GCS_HTTP_URL", "EPATH_USE_TF")}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in gcs_server.environ().items():
            mp.setitem(runs.ENV, key, value)
        yield gcs_server
    for key, value in orbax_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def uri(name: str) -> str:
    return f"gs://{BUCKET}/{name}"


def objects(server, prefix: str) -> list[str]:
    """Names (relative to `prefix`) of every object under gs://test/prefix/, in one listing request."""
    query = urllib.parse.urlencode({"prefix": f"{prefix}/"})
    with urllib.request.urlopen(f"{server.url}/storage/v1/b/{BUCKET}/o?{query}", timeout=10) as r:
        return [item["name"][len(prefix) + 1 :] for item in json.load(r).get("items", [])]


def checkpoint_steps(server, run: str) -> dict[int, bool]:
    """Steps under run/checkpoints/ -> complete (Orbax writes a step in place and commit_success.txt last)."""
    steps: dict[int, bool] = {}
    for name in objects(server, f"{run}/checkpoints"):
        head, _, rest = name.partition("/")
        if head.isdigit():
            steps[int(head)] = steps.get(int(head), False) or rest == "commit_success.txt"
    return steps


def logged_steps(run: str) -> list[int]:
    """The steps of metrics.jsonl's records in the bucket, in file order."""
    try:
        return [
            json.loads(line)["step"] for line in storage.read_text(f"{uri(run)}/metrics.jsonl").splitlines()
        ]
    except FileNotFoundError:
        return []


def losses(run: str) -> dict[int, float]:
    return {step: r["loss"] for step, r in read_jsonl(f"{uri(run)}/metrics.jsonl").items()}


def assert_same_losses(run: str, expected: dict[int, float]) -> None:
    assert logged_steps(run) == sorted(expected), "every step logged exactly once, in order"
    got = losses(run)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), f"step {step}"


@pytest.fixture(scope="module")
def reference(gcs):
    """An uninterrupted `lvm train` on gs:// (test_training_runs' settings): its losses by step."""
    out = runs.run(runs.train_cmd(uri("reference")))
    assert out.returncode == 0, out.stderr[-3000:]
    expected = losses("reference")
    assert sorted(expected) == list(range(1, 13))
    assert not (runs.REPO / "gs:").exists(), "a gs:// path was written as a local folder"
    return expected


def test_log_files_on_gs_keep_each_step_once_across_kills(gcs):
    # a run logs steps 1-5 and flushes, logs 6-7 unflushed, and dies; the next start resumes from step 4
    clock = [0.0]
    first = MetricsWriter(uri("logs"), clock=lambda: clock[0])
    first.resume(0)
    for step in range(1, 8):
        first.write("metrics", {"step": step, "loss": float(step)})
        if step == 5:
            first.flush()
    assert logged_steps("logs") == [1, 2, 3, 4, 5]  # nothing reaches the bucket between flushes
    clock[0] = 61.0  # a minute later the next record uploads everything
    first.write("metrics", {"step": 8, "loss": 8.0})
    assert logged_steps("logs") == list(range(1, 9))
    assert any(n.startswith("tb/events.out.tfevents") for n in objects(gcs, "logs"))
    first.close()
    second = MetricsWriter(uri("logs"))
    second.resume(4)
    for step in range(5, 7):
        second.write("metrics", {"step": step, "loss": 10.0 * step})
    second.close()
    assert logged_steps("logs") == [1, 2, 3, 4, 5, 6]
    assert read_jsonl(f"{uri('logs')}/metrics.jsonl")[6]["loss"] == 60.0
    assert not Path(first.staging).exists() and not Path(second.staging).exists()


@pytest.mark.slow
def test_a_run_writes_every_file_to_the_bucket(gcs):
    cfg = stage_cfg(
        "train.steps=3", "train.checkpoint_every=2", "train.eval_batches=1", "train.profile_steps=1,2"
    )
    result = train(cfg, uri("files"), progress=False)
    assert result.steps == 3 and result.checkpoint_step == 3
    names = set(objects(gcs, "files"))
    for name in ("config.yaml", "run.json", "metrics.jsonl", "eval.jsonl", "summary.json"):
        assert name in names, f"{name} not in the bucket: {sorted(names)}"
    for folder in ("tb/events.out.tfevents", "profile/", "data/train/", "data/val/"):
        assert any(n.startswith(folder) for n in names), f"nothing under {folder}: {sorted(names)}"
    assert checkpoint_steps(gcs, "files") == {2: True, 3: True}
    assert json.loads(storage.read_text(f"{uri('files')}/summary.json"))["steps"] == 3
    assert logged_steps("files") == [1, 2, 3]
    assert checkpoint.read_config(uri("files")).train == cfg.train


@pytest.mark.slow
def test_a_curriculum_on_gs_chains_its_stages_and_skips_finished_ones(gcs, capsys):
    from lvm.curriculum import load_curriculum, run_curriculum

    cur = load_curriculum("tiny", ["train.steps=1", "data.synthetic_docs=16", "train.checkpoint_every=1"])
    summary = run_curriculum(cur, uri("curriculum"), progress=False)
    assert summary["complete"] and list(summary["stages"]) == ["1k", "2k", "4k"]
    assert summary["stages"]["4k"]["workdir"] == uri("curriculum/stages/4k")
    assert json.loads(storage.read_text(f"{uri('curriculum')}/summary.json")) == summary
    assert checkpoint_steps(gcs, "curriculum/stages/4k") == {1: True}
    run_curriculum(cur, uri("curriculum"), progress=False)
    assert capsys.readouterr().out.count("already finished, skipped") == 3


@pytest.mark.slow
def test_kill_during_a_step_and_a_checkpoint_write_and_a_server_restart_then_resume_exactly(gcs, reference):
    cmd = runs.train_cmd(uri("interrupted"))
    # 1. kill -9 during training, once step 5's record reached the bucket (uploaded as checkpoint 6 starts,
    # maybe before checkpoint 4 is complete)
    assert runs.run_until(cmd, lambda: len(logged_steps("interrupted")) >= 5) == -signal.SIGKILL
    # 2. rerun; kill -9 while checkpoint 8 is being written (objects under 8/, no commit_success.txt yet)
    writing = lambda: checkpoint_steps(gcs, "interrupted").get(8) is False
    assert runs.run_until(cmd, writing) == -signal.SIGKILL
    assert writing(), "the partial checkpoint should still be in the bucket"
    # 3. rerun to the end: it resumes from the newest complete checkpoint, never the partial one; the server
    # goes down for 3 s once step 8 is saved again, while steps and checkpoints 10 and 12 want the bucket
    proc = subprocess.Popen(
        cmd, env=runs.ENV, cwd=runs.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        t0 = time.monotonic()
        while not checkpoint_steps(gcs, "interrupted").get(8):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() - t0 < 180, "checkpoint 8 was never completed"
            time.sleep(0.05)
        gcs.restart(down_s=3.0)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()[-3000:]
    starts = json.loads(storage.read_text(f"{uri('interrupted')}/run.json"))["starts"]
    steps = [s["step"] for s in starts]
    assert steps[0] == 0 and steps[1] in (2, 4, 6) and steps[2] == 6, steps
    assert_same_losses("interrupted", reference)
    assert checkpoint_steps(gcs, "interrupted") == {8: True, 10: True, 12: True}, "a partial step was left"
    assert json.loads(storage.read_text(f"{uri('interrupted')}/summary.json"))["checkpoint_step"] == 12


class Remote:
    """What test_multihost.train needs of a workdir, for a gs:// one: str() is the URI; its logs go to `parent`."""

    def __init__(self, name: str, parent: Path):
        self.name, self.parent = name, parent

    def __str__(self) -> str:
        return uri(self.name)


@pytest.mark.slow
def test_two_processes_on_a_gs_workdir_agree_on_time_based_checkpoints_and_resume(gcs, tmp_path, monkeypatch):
    # checkpoint_minutes=0.001 (60 ms) makes nearly every step due by each process's own clock, at different
    # moments: the hosts must follow process 0's decision or their collective saves would not match
    tm = test_multihost
    for key in (
        "TENSORSTORE_GCS_HTTP_URL",
        "EPATH_USE_TF",
    ):  # set by this process's Orbax: a user sets neither
        monkeypatch.delenv(key, raising=False)
    (single,) = tm.train(tmp_path / "single", tm.STEPS, "1,2,1,4", processes=1)

    workdir = Remote("multi", tmp_path)
    config = tm.CONFIG
    monkeypatch.setattr(tm, "CONFIG", [*config, "--set", "train.checkpoint_minutes=0.001"])
    first = tm.train(workdir, tm.FIRST, "1,1,1,8", processes=2)
    monkeypatch.setattr(tm, "CONFIG", config)
    assert [(r["steps"], r["checkpoint_step"]) for r in first] == [(tm.FIRST, tm.FIRST)] * 2
    steps = checkpoint_steps(gcs, "multi")
    assert steps == {tm.FIRST - 1: True, tm.FIRST: True}, steps  # step 3: by time (checkpoint_every=4)
    written = set(storage.listdir(f"{uri('multi')}/checkpoints/{tm.FIRST}/params"))
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= written

    resumed = tm.train(workdir, tm.STEPS, "1,2,1,4", processes=2)
    assert [(r["steps"], r["checkpoint_step"]) for r in resumed] == [(tm.STEPS, tm.STEPS)] * 2
    starts = json.loads(storage.read_text(f"{uri('multi')}/run.json"))["starts"]
    assert [(s["step"], s["processes"], s["devices"]) for s in starts] == [(0, 2, 8), (tm.FIRST, 2, 8)]
    want = read_jsonl(tmp_path / "single" / "metrics.jsonl")
    assert logged_steps("multi") == sorted(want) == list(range(1, tm.STEPS + 1))
    got = read_jsonl(f"{uri('multi')}/metrics.jsonl")
    np.testing.assert_allclose([got[s]["loss"] for s in want], [want[s]["loss"] for s in want], rtol=1e-4)
    for r in resumed:
        np.testing.assert_allclose(r["final_loss"], single["final_loss"], rtol=1e-4)


@pytest.mark.slow
def test_export_and_load_a_model_from_gs(gcs, reference, tmp_path):
    from lvm.cli import run_command
    from lvm.demo.corpus import TEXT_CORPUS
    from lvm.inference import load_model
    from lvm.interop.hf import export_hf
    from lvm.tokenizers import text

    tok = text.train(TEXT_CORPUS, 400, tmp_path / "sp")
    args = ["--workdir", uri("reference"), "--out", uri("export"), "--text-tokenizer", tok.model_file]
    assert run_command("export", args) == 0
    assert {"config.yaml", "tokenizers.json"} <= set(objects(gcs, "export"))
    cfg = checkpoint.read_config(uri("reference"))
    mesh = make_mesh((1, 8, 1, 1))
    a = checkpoint.load_params(uri("reference"), cfg, mesh)
    b = checkpoint.load_params(uri("export"), cfg, mesh)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # inference names the tokenizer recorded by export; a workdir given as a Path (gs:/...) reads the same
    exported = load_model(uri("export")).generate_text("In the beginning", max_new_tokens=4)
    trained = load_model(Path(uri("reference")), text_tokenizer=tok.model_file)
    assert trained.generate_text("In the beginning", max_new_tokens=4) == exported
    written = export_hf(uri("export"), tmp_path / "hf")
    assert Path(written["model"]).stat().st_size > 0 and "tokenizer" in written
