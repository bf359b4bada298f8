"""Fused attention on TPU, shown without a TPU: the tiny model's sharded train step, compiled ahead of time for a
TPU v4 topology with libtpu (nothing runs), contains the Mosaic kernels of the fused forward and of both fused
backward kernels (dq, dk/dv); with the XLA kernel it contains no Mosaic kernel at all."""

import base64
import importlib.util
import json
import re

import pytest

from lvm import planner
from lvm.curriculum import load_curriculum

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
pytestmark = [
    pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[plan]')"),
    pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache"),  # TPU AOT: no client
]
TOPOLOGY = "v4:2x2x1"  # 4 chips
KERNELS = {"_forward_kernel", "_dq_kernel", "_dkv_kernel"}  # the kernel functions in lvm/attention/fused.py


def tiny_cfg(kernel: str):
    """The tiny model's 1k stage on sp=4: per device 256 tokens in zigzag runs of 128, the TPU key tile."""
    overrides = [f"attention.kernel={kernel}", "1k:mesh=1,1,1,4", "1k:train.batch_size=1"]
    return load_curriculum("tiny", overrides).stage("1k").cfg


@pytest.fixture(scope="module")
def compiled_text():
    """kernel -> HLO text of the train step compiled for TPU v4 (each compiled once, ~10 s on 2 cores)."""
    texts = {}

    def get(kernel: str) -> str:
        if kernel not in texts:
            lowered, _, _ = planner.lower_step(tiny_cfg(kernel), planner.tpu_devices(TOPOLOGY))
            texts[kernel] = lowered.compile().as_text()
        return texts[kernel]

    return get


def mosaic_calls(text: str) -> list[tuple[str, str]]:
    """(kernel name, op_name metadata) of each Mosaic custom call, read independently of the planner: the
    instruction's backend config is JSON whose custom_call_config.body is the kernel's MLIR module (base64),
    in which Pallas names the function after the kernel function."""
    calls = []
    for line in text.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        config, _ = json.JSONDecoder().raw_decode(line.split("backend_config=", 1)[1])
        module = base64.b64decode(config["custom_call_config"]["body"])
        names = {n.decode() for n in re.findall(rb"_(?:forward|dq|dkv)_kernel\b", module)}
        assert len(names) == 1, f"one kernel per custom call, got {names}"
        op_name = re.search(r'op_name="([^"]*)"', line)
        calls.append((names.pop(), op_name[1] if op_name else ""))
    return calls


def test_fused_train_step_holds_forward_dq_and_dkv_mosaic_kernels(compiled_text):
    text = compiled_text("fused")
    calls = mosaic_calls(text)
    assert {name for name, _ in calls} == KERNELS
    # the forward kernel runs in the forward pass (and again where remat recomputes it in the backward pass);
    # the dq and dk/dv kernels only in the backward pass (the transpose of the step's jvp)
    forward_pass = [name for name, op in calls if "transpose(" not in op]
    assert "_forward_kernel" in forward_pass and not {"_dq_kernel", "_dkv_kernel"} & set(forward_pass)
    assert all("pallas_call" in op for _, op in calls)
    # the planner's reading of the same text agrees
    counts = planner.mosaic_kernels(text)
    assert counts == {k: sum(name == k for name, _ in calls) for k in KERNELS}
    assert sum(counts.values()) == text.count('custom_call_target="tpu_custom_call"')


def test_xla_train_step_holds_no_mosaic_kernel(compiled_text):
    text = compiled_text("xla")
    assert "tpu_custom_call" not in text and planner.mosaic_kernels(text) == {}
    assert "T(8,128)" in text  # still a TPU program (TPU tiled layouts), only without Pallas kernels


def test_auto_picks_fused_on_tpu_and_xla_on_cpu():
    cfg = tiny_cfg("auto")
    tiles = {
        "q_tile": 128,
        "kv_tile": 128,
        "backward_q_tile": 128,
        "backward_kv_tile": 128,
        "layout_run": 128,
    }
    tpu = planner.attention_kernel(cfg, cfg.mesh, "tpu")
    assert tpu["kernel"] == "fused" and tiles.items() <= tpu.items()
    assert planner.attention_kernel(cfg, cfg.mesh, "cpu")["kernel"] == "xla"
