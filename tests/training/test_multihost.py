"""Two processes x 4 simulated CPU devices (jax.distributed on loopback) train, checkpoint and resume together,
with the per-step losses of one process on 8 devices.

The two-process run is stopped after its first checkpoint and started again, on another mesh:
- first 4 steps, mesh 1,1,1,8: the ring of sequence parallelism spans both processes (each holds every row,
  half of each sequence), and parameters are FSDP-sharded across them;
- then to step 8, mesh 1,2,1,4: rows are split between the processes (each loader reads only its own rows),
  and the step-4 checkpoint, written as shards by both processes, is restored onto the new mesh.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lvm import cpu_devices
from lvm.data_pipeline.emulator import free_port
from lvm.metrics import read_jsonl

STEPS, FIRST = 8, 4
TIMEOUT_S = 300  # per launch; a warm compile cache needs a tenth of it
# The 2k stage of the tiny curriculum at 1K tokens. A constant schedule makes the first leg (train.steps=4)
# take the very steps of an 8-step run (a cosine schedule's shape would depend on train.steps).
SETTINGS = ("train.seq_len=1024", "data.synthetic_doc_len=1025", "train.schedule=constant")
CONFIG = ["--config", "tiny", "--stage", "2k", "--no-progress", "--set", f"train.checkpoint_every={FIRST}"]
CONFIG += [arg for kv in SETTINGS for arg in ("--set", kv)]


def _env(devices: int) -> dict[str, str]:
    return cpu_devices.cpu_env(devices)  # JAX_COMPILATION_CACHE_DIR etc. come from conftest.py's settings


def train(workdir: Path, steps: int, mesh: str, processes: int) -> list[dict]:
    """`lvm train` as `processes` processes (8 devices in all); each process's printed result."""
    args = [sys.executable, "-m", "lvm.cli", "train", *CONFIG, "--workdir", str(workdir)]
    args += ["--set", f"train.steps={steps}", "--set", f"mesh={mesh}"]
    if processes > 1:
        args += ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", str(processes)]
    env = _env(8 // processes)
    logs = workdir.parent / "logs"
    logs.mkdir(exist_ok=True)
    tag = f"{workdir.name}-{steps}"
    procs = []
    try:
        for i in range(processes):
            rank = ["--process-id", str(i)] if processes > 1 else []
            with open(logs / f"{tag}-{i}.out", "w") as out, open(logs / f"{tag}-{i}.err", "w") as err:
                procs.append(subprocess.Popen([*args, *rank], env=env, stdout=out, stderr=err))
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs):  # a failed process leaves the others blocked: stop early
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    failed = []  # every failed process's log tail: the first to fail may not be the first listed
    for i, p in enumerate(procs):
        if p.returncode != 0:
            err = (logs / f"{tag}-{i}.err").read_text().splitlines()
            tail = "\n".join([ln for ln in err if not ln.startswith("[Gloo]")][-30:])
            failed.append(f"process {i} of {tag}: exit {p.returncode} (-9: stopped by the test)\n{tail}")
    assert not failed, "\n\n".join(failed)
    return [json.loads((logs / f"{tag}-{i}.out").read_text().splitlines()[-1]) for i in range(processes)]


@pytest.mark.slow
@pytest.mark.xdist_group("multihost")
def test_two_processes_train_checkpoint_and_resume_like_one(tmp_path):
    (reference,) = train(tmp_path / "single", STEPS, "1,2,1,4", processes=1)

    workdir = tmp_path / "multi"
    first = train(workdir, FIRST, "1,1,1,8", processes=2)
    assert [(r["steps"], r["checkpoint_step"]) for r in first] == [(FIRST, FIRST)] * 2
    # Orbax's OCDBT format: every process writes the shards its devices hold under ocdbt.process_<i>.
    written = {p.name for p in (workdir / "checkpoints" / str(FIRST) / "params").iterdir()}
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= written

    resumed = train(workdir, STEPS, "1,2,1,4", processes=2)
    assert [(r["steps"], r["checkpoint_step"]) for r in resumed] == [(STEPS, STEPS)] * 2
    starts = json.loads((workdir / "run.json").read_text())["starts"]
    assert [(s["step"], s["processes"], s["devices"]) for s in starts] == [(0, 2, 8), (FIRST, 2, 8)]

    want = read_jsonl(tmp_path / "single" / "metrics.jsonl")
    got = read_jsonl(workdir / "metrics.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [got[s]["loss"] for s in sorted(got)], [want[s]["loss"] for s in sorted(want)], rtol=1e-4
    )
    for r in resumed:  # both processes hold the same replicated results
        np.testing.assert_allclose(r["final_loss"], reference["final_loss"], rtol=1e-4)
        np.testing.assert_allclose(r["val"]["loss"], reference["val"]["loss"], rtol=1e-4)
