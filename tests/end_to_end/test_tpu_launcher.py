"""scripts/tpu_pod.sh against a stand-in Google Cloud: a fake `gcloud` on PATH records every call (argv as JSON
lines) and plays queued resources through their states (WAITING_FOR_RESOURCES -> PROVISIONING -> ACTIVE; a test
preempts one: SUSPENDED, slice gone). With `workers`, `tpu-vm ssh/scp` run on local folders, one per worker (a
fresh, empty one each time a slice becomes ACTIVE), beside fake `sudo`, `lsof` (lists the pids in the worker's
`tpu_holders` file) and `hostname`: the commands the launcher sends to the workers really run, and `gcloud storage
cp` copies into a local folder standing for the buckets."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "tpu_pod.sh"
QR = ["compute", "tpus", "queued-resources"]
VM = ["compute", "tpus", "tpu-vm"]
POLL = "--format=value(state.state)"

FAKE_GCLOUD = r"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ["FAKE_GCLOUD_STATE"])
WORKERS = os.environ.get("FAKE_GCLOUD_WORKERS_DIR", "")
N_WORKERS = int(os.environ.get("FAKE_GCLOUD_WORKERS", "2"))
CREATE_STATES = "WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE"


def fail(message):
    print(f"ERROR: (gcloud) {message}", file=sys.stderr)
    return 1


def worker_dirs(selection):
    ids = range(N_WORKERS) if selection == "all" else [int(selection)]
    return [Path(WORKERS) / f"w{i}" for i in ids]


def queued_resource(verb, name, flags, state):
    qrs, nodes = state["qrs"], state["nodes"]
    if verb == "create":
        if name in qrs:
            return fail(f"ALREADY_EXISTS: queued resource {name}")
        states = os.environ.get("FAKE_GCLOUD_CREATE_STATES", CREATE_STATES).split(",")
        qrs[name] = {"node": flags["node-id"], "states": states, "provisioned": False}
        return 0
    if name not in qrs:
        return fail(f"NOT_FOUND: Resource 'queuedResources/{name}' was not found")
    qr = qrs[name]
    if verb == "delete":
        nodes.pop(qr["node"], None)
        del qrs[name]
        return 0
    if verb == "describe":
        now = qr["states"][0]
        if len(qr["states"]) > 1:
            qr["states"].pop(0)
        if now == "ACTIVE" and not qr["provisioned"]:
            qr["provisioned"] = True
            nodes[qr["node"]] = "READY"
            for d in worker_dirs("all") if WORKERS else []:  # fresh VMs
                for _ in range(50):  # (a process of the old VM may still be writing its last lines)
                    shutil.rmtree(d, ignore_errors=True)
                    if not d.exists():
                        break
                    time.sleep(0.1)
                d.mkdir(parents=True)
        print(now)
        return 0
    return fail(f"fake gcloud: queued-resources {verb} is not faked")


def tpu_vm(verb, words, flags, state):
    nodes = state["nodes"]
    name = (words[5] if verb == "scp" else words[4]).split(":")[0]
    if name not in nodes:
        return fail(f"NOT_FOUND: Resource 'nodes/{name}' was not found")
    if verb == "describe":
        print(nodes[name])
        return 0
    if verb == "delete":
        del nodes[name]
        return 0
    if nodes[name] != "READY":
        return fail(f"slice {name} is {nodes[name]}")
    if not WORKERS:
        return 0
    if verb == "scp":
        for d in worker_dirs(flags["worker"]):
            shutil.copy(words[4], d / words[5].split(":", 1)[1])
        return 0
    if verb == "ssh":  # on every worker at once, as gcloud does
        runs = [
            subprocess.Popen(
                ["bash", "-c", flags["command"]],
                cwd=d,
                env=dict(os.environ, HOME=str(d), FAKE_HOSTNAME=f"{name}-{d.name}"),
            )
            for d in worker_dirs(flags["worker"])
        ]
        return max(run.wait() for run in runs)
    return fail(f"fake gcloud: tpu-vm {verb} is not faked")


def storage_cp(src, dst):
    target = Path(os.environ["FAKE_GCS_DIR"]) / dst.removeprefix("gs://")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, target.with_suffix(".part"))
    os.replace(target.with_suffix(".part"), target)
    return 0


def main(argv):
    with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
        log.write(json.dumps(argv) + "\n")
    words = [a for a in argv if not a.startswith("-")]
    flags = {}
    for a in argv:
        if a.startswith("--"):
            key, _, value = a[2:].partition("=")
            flags[key] = value
    state = json.loads(STATE.read_text()) if STATE.exists() else {"qrs": {}, "nodes": {}}
    before = json.dumps(state)
    if words[:3] == ["compute", "tpus", "queued-resources"]:
        rc = queued_resource(words[3], words[4], flags, state)
    elif words[:3] == ["compute", "tpus", "tpu-vm"]:
        rc = tpu_vm(words[3], words, flags, state)
    elif words[:2] == ["storage", "cp"]:
        rc = storage_cp(words[2], words[3])
    else:
        rc = fail(f"fake gcloud: {argv} is not faked")
    if json.dumps(state) != before:
        STATE.write_text(json.dumps(state))
    return rc


sys.exit(main(sys.argv[1:]))
"""

WORKER_TOOLS = {
    "sudo": 'exec "$@"\n',
    "hostname": 'echo "$FAKE_HOSTNAME"\n',
    # the live pids listed in the worker's tpu_holders file (what `lsof -t /dev/accel* /dev/vfio/*` prints)
    "lsof": '[ -f "$HOME/tpu_holders" ] || exit 1\nwhile read -r pid; do\n'
    '  s=$(cut -d" " -f3 "/proc/$pid/stat" 2>/dev/null) && [ "$s" != Z ] && echo "$pid"\n'
    'done < "$HOME/tpu_holders"\n',
}
LAUNCHER_SETTINGS = (
    "TPU_NAME QR_NAME ACCELERATOR ZONE RUNTIME PROJECT SPOT SERVICE_ACCOUNT CREATE_FLAGS REMOTE_DIR REPO_URL "
    "REPO_BRANCH NFS_SHARE SHARED_DIR SETUP_CMD LOG_DIR LIBTPU_INIT_ARGS STOP_GRACE ZONE_CHECK SSH_FLAGS "
    "ACTIVE_TIMEOUT MAX_RESTARTS MAX_FAILURES"
).split()


class Cloud:
    """The fake gcloud for one test and a way to run the launcher against it."""

    def __init__(self, tmp: Path, workers: bool = False):
        self.tmp = tmp
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        (bin_dir / "gcloud").write_text(f"#!{sys.executable} -S\n{FAKE_GCLOUD}")  # -S: standard library only
        for name, body in WORKER_TOOLS.items() if workers else []:
            (bin_dir / name).write_text(f"#!/bin/bash\n{body}")
        for tool in bin_dir.iterdir():
            tool.chmod(0o755)
        self.workers = tmp / "workers"
        self.buckets = tmp / "gcs"
        self.lockfile = tmp / "libtpu_lockfile"
        self.env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_SETTINGS}
        self.env |= {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "FAKE_GCLOUD_STATE": str(tmp / "cloud.json"),
            "FAKE_GCLOUD_LOG": str(tmp / "calls.jsonl"),
            "FAKE_GCS_DIR": str(self.buckets),
            "STATE_DIR": str(tmp / "launcher-state"),
            "TPU_NAME": "lwm",
            "POLL_SECONDS": "0.01",
            "LIBTPU_LOCKFILE": str(self.lockfile),
            "LOG_UPLOAD_SECONDS": "0.2",
        }
        if workers:
            self.env["FAKE_GCLOUD_WORKERS_DIR"] = str(self.workers)

    def __call__(self, *args: str, rc: int = 0, **env: str) -> subprocess.CompletedProcess:
        """Run `scripts/tpu_pod.sh ARGS` with the extra environment `env`; check its exit status."""
        done = subprocess.run(
            ["bash", str(SCRIPT), *args],
            env=self.env | env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == rc, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done

    def calls(self, since: int = 0) -> list[list[str]]:
        path = self.tmp / "calls.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines[since:]]

    def ssh_commands(self, since: int = 0) -> list[str]:
        """The shell commands sent to the workers."""
        return [flag(c, "--command") for c in self.calls(since) if c[:4] == [*VM, "ssh"]]

    def preempt(self, qr: str = "lwm"):
        """What a spot preemption does: the queued resource SUSPENDED, its slice and every process on it gone."""
        state = json.loads((self.tmp / "cloud.json").read_text())
        state["qrs"][qr]["states"] = ["SUSPENDED"]
        del state["nodes"][state["qrs"][qr]["node"]]
        (self.tmp / "cloud.json").write_text(json.dumps(state))
        self.kill_runs()
        for pidfile in self.workers.glob("w*/lvm/lvm.pid"):
            wait_for(pidfile.with_name("lvm.exit").exists)

    def set_slice(self, qr_states: list[str] | None, node_state: str | None):
        """Put queued resource `lwm` (None: none) and its slice (None: none) in the given states."""
        provisioned = bool(qr_states) and qr_states[0] == "ACTIVE"  # else: the slice appears once ACTIVE
        qrs = {"lwm": {"node": "lwm", "states": qr_states, "provisioned": provisioned}} if qr_states else {}
        nodes = {"lwm": node_state} if node_state else {}
        (self.tmp / "cloud.json").write_text(json.dumps({"qrs": qrs, "nodes": nodes}))

    def kill_runs(self):
        """End what the workers' runs left behind (after a failed test)."""
        for pidfile in self.workers.glob("w*/lvm/lvm.pid"):
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass

    def provision(self):
        """What `copy` + `setup` leave on every worker, for tests about `run` and `stop`."""
        for worker in sorted(self.workers.iterdir()):
            (worker / "lvm" / ".venv" / "bin").mkdir(parents=True)
            (worker / "lvm" / ".venv" / "bin" / "activate").write_text("")


@pytest.fixture
def cloud(tmp_path):
    """The stand-in Google Cloud, recording only: ssh and scp do nothing."""
    return Cloud(tmp_path)


@pytest.fixture
def pod(tmp_path):
    """The stand-in Google Cloud whose slices have two workers (local folders) that run what ssh sends."""
    workers = Cloud(tmp_path, workers=True)
    yield workers
    workers.kill_runs()


def flag(argv: list[str], name: str) -> str:
    return next(a.removeprefix(f"{name}=") for a in argv if a.startswith(f"{name}="))


def wait_for(condition, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        time.sleep(0.05)


def worker_file(cloud: Cloud, worker: int, name: str) -> Path:
    return cloud.workers / f"w{worker}" / "lvm" / name


def test_shellcheck_passes():
    if shutil.which("shellcheck") is None:
        pytest.skip(
            "shellcheck is not installed (Debian: apt-get install shellcheck; `make test` installs it)"
        )
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    "accelerator, flags, created",
    [
        (
            "v4-256",
            [],
            ["--accelerator-type=v4-256", "--runtime-version=tpu-ubuntu2204-base", "--zone=us-central2-b"],
        ),
        (
            "v5litepod-256",
            [],
            [
                "--accelerator-type=v5litepod-256",
                "--runtime-version=v2-alpha-tpuv5-lite",
                "--zone=us-west4-a",
            ],
        ),
        (
            "v5e-16",
            [],
            ["--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--zone=us-west4-a"],
        ),
        (
            "v5p-128",
            ["--spot"],
            ["--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5", "--spot", "--zone=us-east5-a"],
        ),
        (
            "v6e-64",
            [],
            ["--accelerator-type=v6e-64", "--runtime-version=v2-alpha-tpuv6e", "--zone=us-east1-d"],
        ),
    ],
)
def test_create_requests_a_queued_resource_and_polls_until_active(cloud, accelerator, flags, created):
    done = cloud("create", *flags, ACCELERATOR=accelerator)
    zone = created[-1]
    assert cloud.calls() == [
        [*QR, "create", "lwm", "--node-id=lwm", *created],
        [*QR, "describe", "lwm", POLL, zone],
        [*QR, "describe", "lwm", POLL, zone],
        [*QR, "describe", "lwm", POLL, zone],
    ]
    states = [
        line.split(": ")[1] for line in done.stdout.splitlines() if line.startswith("queued resource lwm:")
    ]
    assert states == ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]


def test_create_passes_the_service_account_project_and_extra_flags(cloud):
    cloud(
        "create",
        ACCELERATOR="v5p-64",
        ZONE="us-central1-a",
        PROJECT="my-project",
        SERVICE_ACCOUNT="lvm-tpu@my-project.iam.gserviceaccount.com",
        CREATE_FLAGS="--network=lvm-net --subnetwork=lvm-sub",
    )
    assert cloud.calls()[0] == [
        *QR,
        "create",
        "lwm",
        "--node-id=lwm",
        "--accelerator-type=v5p-64",
        "--runtime-version=v2-alpha-tpuv5",
        "--service-account=lvm-tpu@my-project.iam.gserviceaccount.com",
        "--scopes=https://www.googleapis.com/auth/cloud-platform",
        "--network=lvm-net",
        "--subnetwork=lvm-sub",
        "--zone=us-central1-a",
        "--project=my-project",
    ]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"ACCELERATOR": "v3-8"}, "unknown accelerator type 'v3-8'"),
        ({"ACCELERATOR": "tpu7x-64"}, "unknown accelerator type 'tpu7x-64'"),
        ({"ACCELERATOR": "v5p"}, "unknown accelerator type 'v5p'"),
        (
            {"ACCELERATOR": "v5p-128", "ZONE": "us-central2-b"},
            "v5p slices are offered in us-east5-a us-central1-a",
        ),
        ({"ACCELERATOR": "v6e-8", "RUNTIME": "v2-alpha-tpuv5"}, "its runtime is v2-alpha-tpuv6e"),
        ({"ACCELERATOR": "v4-32", "CREATE_FLAGS": "--preemptible"}, "--preemptible is legacy"),
    ],
)
def test_refuses_what_it_does_not_know(cloud, settings, message):
    done = cloud("create", rc=2, **settings)
    assert message in done.stderr
    assert cloud.calls() == []


def test_a_zone_google_added_later_is_accepted_on_request(cloud):
    cloud("create", ACCELERATOR="v5p-8", ZONE="europe-west4-b", ZONE_CHECK="0")
    assert "--zone=europe-west4-b" in cloud.calls()[0]


@pytest.mark.parametrize(
    "states, timeout, message",
    [
        ("WAITING_FOR_RESOURCES,PROVISIONING,FAILED", "600", "queued resource lwm is FAILED"),
        ("WAITING_FOR_RESOURCES,SUSPENDED", "600", "queued resource lwm is SUSPENDED"),
        ("WAITING_FOR_RESOURCES", "0", "still WAITING_FOR_RESOURCES after 0s; it stays queued"),
    ],
)
def test_create_fails_clearly_when_the_request_fails_or_times_out(cloud, states, timeout, message):
    done = cloud("create", rc=2, FAKE_GCLOUD_CREATE_STATES=states, ACTIVE_TIMEOUT=timeout)
    assert message in done.stderr


def test_delete_removes_the_queued_resource_and_waits_until_it_is_gone(cloud):
    cloud("create", ACCELERATOR="v6e-16")
    since = len(cloud.calls())
    cloud("delete", ACCELERATOR="v6e-16")
    zone = "--zone=us-east1-d"
    assert cloud.calls(since) == [
        [*QR, "describe", "lwm", POLL, zone],
        [*QR, "delete", "lwm", "--force", "--quiet", zone],
        [*QR, "describe", "lwm", POLL, zone],
        [*VM, "describe", "lwm", "--format=value(state)", zone],
    ]


@pytest.mark.parametrize("workdir", ["gs://bucket/runs/lwm", "shared"])
def test_run_clears_the_tpu_then_starts_everywhere_with_logs_that_outlive_the_slice(pod, tmp_path, workdir):
    pod("create")
    pod.provision()
    if workdir == "shared":  # an NFS folder every worker sees
        workdir = str(tmp_path / "nfs" / "runs" / "lwm")
    stale = subprocess.Popen(["sleep", "300"])  # a process left holding worker 1's TPU
    (pod.workers / "w1" / "tpu_holders").write_text(f"{stale.pid}\n")
    pod.lockfile.write_text("")
    script = 'echo "step 1 flags=$LIBTPU_INIT_ARGS"; sleep 0.6; echo "step 2"'
    since = len(pod.calls())
    done = pod("run", "bash", "-c", script, "train", "--workdir", workdir, LIBTPU_INIT_ARGS="--xla_flag=1")

    assert stale.wait(timeout=5) == -signal.SIGKILL
    assert "killing TPU holders" in done.stdout
    assert not pod.lockfile.exists()
    ssh = pod.ssh_commands(since)
    assert len(ssh) == 3 and "worker_state" in ssh[0]
    assert "worker_clean" in ssh[1] and "sudo lsof -t /dev/accel* /dev/vfio/*" in ssh[1]
    assert "sudo rm -f" in ssh[1] and str(pod.lockfile) in ssh[1]
    assert "worker_start" in ssh[2] and "--workdir" in ssh[2]
    assert [flag(c, "--worker") for c in pod.calls(since)] == ["0", "all", "all"]

    if workdir.startswith("gs://"):
        logs = pod.buckets / "bucket" / "runs" / "lwm" / "logs"
        wait_for(lambda: len(list(logs.glob("host-lwm-w*-*.log"))) == 2)  # copied up while the run goes on
    else:
        logs = Path(workdir) / "logs"
    for worker in (0, 1):
        wait_for(worker_file(pod, worker, "lvm.exit").exists)
        assert worker_file(pod, worker, "lvm.exit").read_text() == "0\n"
    if workdir.startswith("gs://"):
        wait_for(lambda: all("exit status 0" in p.read_text() for p in logs.glob("*.log")))
    texts = sorted(p.read_text() for p in logs.glob("host-lwm-w*-*.log"))
    assert len(texts) == 2
    for text in texts:
        assert "step 1 flags=--xla_flag=1\nstep 2\n" in text and "exit status 0" in text
    # the local name `logs` follows points at this run's log
    assert worker_file(pod, 0, "lvm.log").read_text() == next(logs.glob("host-lwm-w0-*.log")).read_text()


@pytest.mark.parametrize("on_term", ["checkpoint", "ignore"])
def test_stop_sends_sigterm_then_sigkill_after_the_grace_period(pod, on_term):
    pod("create")
    pod.provision()
    handler = "echo saving; exit 143" if on_term == "checkpoint" else ""
    pod("run", "bash", "-c", f"trap '{handler}' TERM; echo started; while :; do sleep 0.05; done")
    wait_for(lambda: "started" in worker_file(pod, 1, "lvm.log").read_text())
    refused = pod("run", "true", rc=2)
    assert "worker 0 is still running" in refused.stderr
    since = len(pod.calls())

    start = time.monotonic()
    done = pod("stop", STOP_GRACE="1")
    took = time.monotonic() - start
    assert "worker_stop 1" in pod.ssh_commands(since)[0]
    for worker in (0, 1):
        wait_for(worker_file(pod, worker, "lvm.exit").exists)
    status = worker_file(pod, 0, "lvm.exit").read_text().strip()
    if on_term == "checkpoint":
        assert status == "143" and "SIGKILL" not in done.stdout and took < 5
        assert "saving" in worker_file(pod, 0, "lvm.log").read_text()
    else:
        assert status == "137" and took >= 1
        assert done.stdout.count("still running 1s after SIGTERM: SIGKILL") == 2
    assert "run on worker 0: exited" in pod("status").stdout
    assert pod("stop", "--grace", "5").stdout.count("no run") == 2


def test_recover_after_a_preemption_recreates_sets_up_and_restarts_the_same_command(cloud):
    settings = {"ACCELERATOR": "v5p-128", "REPO_URL": "https://example.org/lvm.git"}
    cloud("create", "--spot", **settings)
    command = ["lvm", "curriculum", "--config", "lwm_text", "--workdir", "gs://bucket/runs/lwm text"]
    cloud("run", *command, **settings)
    first_start = cloud.ssh_commands()[-1]

    since = len(cloud.calls())
    assert "nothing to recover" in cloud("recover").stdout  # healthy: nothing happens
    assert [c[3] for c in cloud.calls(since)] == ["describe", "describe"]

    cloud.preempt()
    since = len(cloud.calls())
    done = cloud("recover")  # settings and the command come from what create and run saved
    assert "queued resource lwm is SUSPENDED, slice lwm is MISSING: recreating" in done.stdout
    zone = "--zone=us-east5-a"
    steps = [c[:5] if c[:4] != [*VM, "ssh"] else ["ssh", flag(c, "--worker")] for c in cloud.calls(since)]
    assert steps == [
        [*QR, "describe", "lwm"],
        [*VM, "describe", "lwm"],
        [*QR, "describe", "lwm"],  # delete: what is left
        [*QR, "delete", "lwm"],
        [*QR, "describe", "lwm"],
        [*VM, "describe", "lwm"],
        [*QR, "create", "lwm"],
        [*QR, "describe", "lwm"],
        [*QR, "describe", "lwm"],
        [*QR, "describe", "lwm"],
        ["ssh", "all"],  # copy (git clone)
        ["ssh", "all"],  # setup
        ["ssh", "0"],  # is a run going?
        ["ssh", "all"],  # clean
        ["ssh", "all"],  # start
    ]
    calls = cloud.calls(since)
    assert calls[3] == [*QR, "delete", "lwm", "--force", "--quiet", zone]
    assert calls[6] == [
        *QR,
        "create",
        "lwm",
        "--node-id=lwm",
        "--accelerator-type=v5p-128",
        "--runtime-version=v2-alpha-tpuv5",
        "--spot",
        zone,
    ]
    copy, setup, _, clean, start = cloud.ssh_commands(since)
    assert "git clone --branch main https://example.org/lvm.git lvm" in copy
    assert 'pip install -q -c requirements.lock -e ".[tpu]"' in setup
    assert "worker_clean" in clean
    # the same command, quoted the same way; only the log's time stamp differs
    assert start.split("worker_start")[-1].split()[3:] == first_start.split("worker_start")[-1].split()[3:]
    assert "gs://bucket/runs/lwm\\ text" in start

    cloud("delete")
    since = len(cloud.calls())
    assert "deleted with `delete`: not recovering it" in cloud("watch").stdout
    assert cloud.calls(since) == []


RECREATE = ["describe", "describe", "delete", "describe", "create", "describe", "describe", "describe"]


@pytest.mark.parametrize(
    "qr_states, node_state, rc, verbs",
    [
        # still in the queue: wait for it, then set up and start (nothing deleted)
        (["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"], None, 0, ["describe"] * 3),
        # the request is ACTIVE but its slice was preempted or is gone: recreate
        (["ACTIVE"], "PREEMPTED", 0, RECREATE),
        (["ACTIVE"], None, 0, RECREATE),
        # a slice under repair, or one made without a queued resource: leave it
        (["ACTIVE"], "REPAIRING", 3, ["describe"]),
        (None, "READY", 0, ["describe"]),
    ],
)
def test_recover_decides_from_the_request_and_the_slice(cloud, qr_states, node_state, rc, verbs):
    cloud.set_slice(qr_states, node_state)
    cloud("recover", "lvm", "train", rc=rc, ACCELERATOR="v5p-8", REPO_URL="https://example.org/lvm.git")
    assert [c[3] for c in cloud.calls() if c[:3] == QR] == verbs
    assert len(cloud.ssh_commands()) == (5 if rc == 0 and node_state != "READY" else 0)


def test_watch_recovers_a_preempted_slice_and_returns_when_the_run_finishes(pod, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("lvm\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "lvm"], check=True)
    settings = {
        "ACCELERATOR": "v5p-128",
        "REPO_URL": str(repo),
        "SETUP_CMD": "mkdir -p .venv/bin && touch .venv/bin/activate",
    }
    finish = tmp_path / "finish"  # stands for the checkpoint the restarted run resumes from
    training = f"echo training; while [ ! -e {finish} ]; do sleep 0.05; done; echo resumed and finished"
    pod("create", "--spot", **settings)
    pod("copy")
    pod("setup")
    assert worker_file(pod, 1, "README.md").exists()
    pod("run", "bash", "-c", training, "--workdir", "gs://bucket/runs/lwm")
    logs = pod.buckets / "bucket" / "runs" / "lwm" / "logs"
    wait_for(lambda: any("training" in log.read_text() for log in logs.glob("host-lwm-w0-*.log")))

    pod.preempt()
    finish.write_text("")
    time.sleep(1)  # a log is named after the second its run started
    since = len(pod.calls())
    done = pod("watch")  # what to recreate, set up and restart: as create and run saved it
    assert "recreating" in done.stdout and "the run finished" in done.stdout
    verbs = [c[3] for c in pod.calls(since) if c[:3] == QR]
    assert "delete" in verbs and verbs.count("create") == 1
    assert worker_file(pod, 0, "lvm.exit").read_text() == "0\n"
    assert "resumed and finished" in worker_file(pod, 1, "lvm.log").read_text()
    assert len(list(logs.glob("host-lwm-w0-*.log"))) == 2  # the preempted run's log and the recovered run's


def test_watch_restarts_a_run_that_failed_on_a_healthy_slice(pod, tmp_path):
    pod("create")
    pod.provision()
    # the first start fails (as after a host restarted by maintenance), the second ends well
    tries = tmp_path / "tries"
    pod("run", "bash", "-c", f'echo x >> {tries}-$(hostname); [ "$(wc -l < {tries}-$(hostname))" -gt 1 ]')
    done = pod("watch")
    assert "the run ended on a healthy slice (exited 1): restart 1 of 3" in done.stdout
    assert "the run finished" in done.stdout
    assert [c[3] for c in pod.calls() if c[:3] == QR].count("create") == 1  # the slice stayed


def test_help_lists_every_command(cloud):
    done = cloud("help")
    for verb in "create wait status copy setup clean run logs stop recover watch ssh delete".split():
        assert f"\n  {verb}" in done.stdout
    assert "unknown command: launch" in cloud("launch", rc=2).stderr
