"""`scripts/gpu_check.sh` / `lvm.bench.gpu`: the one-GPU check, run here in smoke mode on CPU, its GPU programs
lowered for CUDA without a GPU, its budget and search logic, and its targets' verdicts on synthetic rows."""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import pytest

import lvm.attention.ring as ring
import lvm.model as model
from lvm.bench import common
from lvm.bench.gpu import attention as gpu_attention
from lvm.bench.gpu import budget, max_context, measure, report, step, targets, vqgan_encode
from lvm.bench.gpu.settings import FULL, GRAD_TOLERANCE, IMPLS, SECTIONS

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def positive(x) -> bool:
    return isinstance(x, int | float) and x > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """scripts/gpu_check.sh --smoke: every section with tiny shapes (fused kernels in Pallas interpret mode)."""
    out = tmp_path_factory.mktemp("gpu-smoke")
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(SCRIPT), "--smoke", "--out", str(out)], capture_output=True, text=True, env=env, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((out / "gpu_check.json").read_text())
    return payload, (out / "gpu_check.md").read_text(), time.perf_counter() - t0


def test_script_is_executable_and_strict():
    assert os.access(SCRIPT, os.X_OK)
    text = SCRIPT.read_text()
    assert "set -euo pipefail" in text and "timeout" in text and "PYTHONPATH" in text
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" in text


def test_smoke_measures_every_section(smoke):
    p, _, _ = smoke
    assert p["smoke"] and p["machine"]["jax_version"] == jax.__version__ and p["machine"]["device_kind"]
    assert positive(p["matmul"]["flops_per_s"]) and len(p["matmul"]["times_s"]) >= 2
    for name in SECTIONS:
        section = p["sections"][name]
        assert section["error"] is None and positive(section["used_s"]) and positive(section["budget_s"]), (
            name
        )

    rows = {(r["impl"], r["causal"]): r for r in p["attention"]}
    assert set(rows) == {(i, c) for i in IMPLS for c in (True, False)}
    for (impl, causal), r in rows.items():
        assert r["seq_len"] == 512 and not r.get("error") and not r.get("skipped"), r
        for key in ("time_s", "flops", "flops_per_s", "of_matmul", "of_cudnn", "compile_s"):
            assert positive(r[key]), (impl, causal, key)
        assert r["flops"] == common.attention_flops(512, 2, 64, 1, causal)
        assert r["time_s"] == statistics.median(r["times_s"])
        if impl != "cudnn":  # the reference: cuDNN's gradients (on CPU its stand-in, XLA's attention)
            assert r["grad_error_vs"] == "cudnn" and r["grad_max_rel_err"] < GRAD_TOLERANCE
            assert r["tiles"]["forward"] and r["tiles"]["backward"]
    assert rows[("xla", True)]["tiles"]["forward"] == [128, 128]  # q_chunk = kv_chunk = the smoke's xla_chunk
    assert rows[("fused", True)]["kernel"] == "tpu (interpret)"  # on CPU the fused kernels are interpreted

    train = {r["kernel"]: r for r in p["train"]}
    assert set(train) == {"fused", "xla"}
    for r in train.values():
        for key in ("step_s", "tokens_per_s", "model_flops_per_s", "mfu", "of_matmul", "compile_s"):
            assert positive(r[key]), (r["kernel"], key)
        assert r["loss_finite"] and r["seq_len"] == 512 and positive(r["memory"]["peak_bytes"])
        assert r["tokens_per_s"] == pytest.approx(512 / r["step_s"])

    mc = p["max_context"]
    assert mc["kernel"] == "fused" and positive(mc["memory_limit_bytes"])
    assert [q["seq_len"] for q in mc["probes"]] == [512, 1024] and all(
        positive(q["peak_bytes"]) for q in mc["probes"]
    )
    assert mc["fits_up_to"] == 1024 and positive(mc["bytes_per_token"])
    assert (
        mc["confirmed"]["seq_len"] == 1024
        and positive(mc["confirmed"]["step_s"])
        and mc["confirmed"]["loss_finite"]
    )

    vq = p["vqgan_encode"]
    assert vq["config"] == "tiny" and vq["resolution"] == 64 and vq["codes_per_frame"] == 64
    assert [r["batch"] for r in vq["encode"]] == [8] and positive(vq["encode"][0]["frames_per_s"])
    assert vq["encode_frames_per_s"] == vq["encode"][0]["frames_per_s"]
    decode = vq["decode"]  # decord, Pillow and ffmpeg are installed here: the decode half runs
    assert not decode.get("error") and decode["workers"] >= 1 and decode["sample_fps"] == 3
    assert [r["workers"] for r in decode["rows"]] == sorted({1, decode["workers"]})
    assert all(r["frames"] == 6 * r["workers"] and positive(r["frames_per_s"]) for r in decode["rows"])
    assert isinstance(vq["keeps_up"], bool) and vq["workers_needed"] >= 1

    t = p["targets"]
    assert t["fused_vs_cudnn"]["measured"] == pytest.approx(rows[("fused", True)]["of_cudnn"])
    assert t["mfu_1b"]["measured"] == pytest.approx(train["fused"]["mfu"])
    assert all(isinstance(x["met"], bool) for x in t.values())
    assert all(x["reason"].startswith(("passes (needs", "fails (needs")) for x in t.values())


def test_smoke_markdown_has_every_table(smoke):
    _, md, seconds = smoke
    for heading in ("## Targets", "## Attention fwd+bwd", "## Training step", "## Longest trainable context"):
        assert heading in md
    assert "## Sections (seconds)" in md and "SMOKE" in md
    assert (
        "## VQGAN encode (tiny config) and decode workers" in md
        and "Decoding keeps up with the encode:" in md
    )
    assert md.count("| cudnn ") == 2 and md.count("| fused ") >= 2 and "Confirmed: one step at 1024" in md
    print(f"smoke run: {seconds:.1f} s")


def test_gpu_programs_lower_for_cuda(monkeypatch):
    """Without a GPU: the real run's attention programs (32K tokens, 32 heads x 128, bf16) and the 1B training
    step at 32K lower for CUDA, the fused ones to Triton kernels (Pallas), the xla ones without any."""
    monkeypatch.setattr(ring, "mesh_platform", lambda mesh: "gpu")
    monkeypatch.setattr(model, "mesh_platform", lambda mesh: "gpu")
    mesh1 = jax.make_mesh((1,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    run = types.SimpleNamespace(backend="gpu", settings=FULL, mesh1=mesh1)
    s = FULL
    x = jax.ShapeDtypeStruct((1, s.target_seq, s.heads, s.head_dim), jnp.bfloat16)
    w = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    for impl in ("fused", "xla"):
        for causal in (True, False):
            lowered = jax.jit(gpu_attention.attention_fn(run, impl, causal)).trace(x, x, x, w)
            text = lowered.lower(lowering_platforms=("cuda",)).as_text()
            assert (text.count("xla.gpu.triton") >= 3) == (impl == "fused"), (impl, causal)
    assert gpu_attention.describe_impl(run, "fused", s.target_seq)["tiles"] == {
        "forward": [128, 64],
        "backward": [64, 64],
    }
    assert gpu_attention.describe_impl(run, "xla", s.target_seq)["tiles"]["forward"] == [2048, 2048]

    from lvm.optim import make_optimizer
    from lvm.planner import abstract_args
    from lvm.sharding import make_mesh

    cfg = step.model_config(run, s.train_seq, "fused")
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.attention.kernel) == (2048, 16, "fused")
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    optimizer = make_optimizer(cfg.train)
    traced = model.make_train_step(cfg, mesh, optimizer).trace(*abstract_args(cfg, mesh, optimizer))
    assert traced.lower(lowering_platforms=("cuda",)).as_text().count("xla.gpu.triton") >= 3


def test_next_probe_brackets_the_longest_fitting_length():
    """Memory a + b*n: doubling, then the straight line's prediction, then a one-step bracket in a few probes."""
    step, usable = 16384, 70e9
    peak = lambda n: 20e9 + 110e3 * n
    truth = max(n for n in range(step, 1 << 23, step) if peak(n) <= usable)
    peaks = {32768: peak(32768)}
    while (n := max_context.next_probe(peaks, usable, step, 1 << 22)) is not None:
        peaks[n] = peak(n)
    assert len(peaks) <= 4 and list(peaks)[1] == 65536  # doubled first
    fits = max(n for n, p in peaks.items() if p <= usable)
    assert fits == truth and truth + step in peaks  # bracketed to one step
    # a length that failed to compile counts as too big; the longest length probed caps the search
    assert max_context.next_probe({32768: 30e9, 65536: float("inf")}, usable, step, 1 << 22) == 49152
    assert max_context.next_probe({32768: 30e9, 65536: 40e9}, usable, step, 131072) == 131072
    assert max_context.next_probe({32768: 30e9, 65536: 40e9, 131072: 60e9}, usable, step, 131072) is None
    assert (
        max_context.next_probe({32768: 80e9}, usable, step, 1 << 22) == 16384
    )  # even the first is too big: halve


def test_budget_carries_unused_time_and_skips_with_a_note(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])
    clock_budget = budget.Budget({"a": 10, "b": 20, "c": 50}, deadline_s=60, started=100.0)
    a = clock_budget.open("a")
    clock[0] += 4
    clock_budget.close(a)  # 6 s unused
    b = clock_budget.open("b")
    assert b.budget_s == 26
    assert b.allows(25, "x") and not b.allows(27, "the case at 128K")
    assert b.notes == ["skipped the case at 128K: needs about 27 s, 26 s left of the b budget"]
    clock[0] += 30
    clock_budget.close(b)  # 4 s over
    assert clock_budget.open("c").budget_s == 26  # capped by the deadline (60 - 34), not 50 - 4


def test_attention_case_order_and_card_names():
    cases = gpu_attention.attention_cases(FULL)
    assert len(cases) == 18 and cases[0] == {"seq_len": 8192, "causal": True, "impl": "cudnn"}
    assert [(c["impl"], c["seq_len"]) for c in cases[-2:]] == [("xla", 131072)] * 2  # slowest last
    target = [c for c in cases if c["seq_len"] == 32768 and c["causal"]]
    assert cases.index(target[0]) < 9  # the 32K causal target is measured early
    assert measure.card_slug("NVIDIA H100 80GB HBM3") == "h100" and measure.card_slug("NVIDIA H200") == "h200"
    assert measure.card_slug("NVIDIA A100-SXM4-80GB") == "a100" and measure.card_slug("cpu") == "cpu"


# ---- targets: verdicts on synthetic rows ------------------------------------------------------------------


def attention_row(impl, flops_per_s, seq_len=32768, causal=True, **extra):
    return {
        "impl": impl,
        "seq_len": seq_len,
        "causal": causal,
        "time_s": 1.0,
        "flops_per_s": flops_per_s,
        **extra,
    }


def train_row(kernel, mfu, **extra):
    return {"kernel": kernel, "seq_len": 32768, "step_s": 2.0, "mfu": mfu, **extra}


def test_fused_vs_cudnn_passes_and_fails_at_the_target_length_only():
    cudnn = attention_row("cudnn", 500e12)
    other_lengths = [
        attention_row("fused", 100e12, seq_len=8192),
        attention_row("fused", 100e12, causal=False),
    ]
    passing = targets.fused_vs_cudnn([*other_lengths, cudnn, attention_row("fused", 450e12)], FULL)
    assert passing["met"] is True and passing["measured"] == pytest.approx(0.9)
    assert passing["reason"] == "passes (needs >= 0.8x cuDNN): 0.90x cuDNN"

    failing = targets.fused_vs_cudnn([cudnn, attention_row("fused", 250e12)], FULL)
    assert failing["met"] is False and failing["measured"] == pytest.approx(0.5)
    assert failing["reason"] == "fails (needs >= 0.8x cuDNN): 0.50x cuDNN"
    assert "0.8 x cuDNN's at 32768 tokens, causal" in failing["rule"]


def test_fused_vs_cudnn_says_why_it_was_not_measured():
    rows = [
        attention_row("cudnn", 500e12),
        {"impl": "fused", "seq_len": 32768, "causal": True, "error": "XlaRuntimeError: RESOURCE_EXHAUSTED"},
    ]
    t = targets.fused_vs_cudnn(rows, FULL)
    assert t["met"] is None and t["measured"] is None
    assert (
        t["reason"]
        == "not measured at 32768 tokens, causal: fused error: XlaRuntimeError: RESOURCE_EXHAUSTED"
    )

    skipped = {
        "impl": "fused",
        "seq_len": 32768,
        "causal": True,
        "skipped": "skipped fused S=32768 causal: ...",
    }
    t = targets.fused_vs_cudnn([skipped], FULL)
    assert t["met"] is None
    assert t["reason"] == "not measured at 32768 tokens, causal: fused skipped (time budget); cudnn not run"


def test_mfu_target_passes_fails_and_reads_only_the_fused_step():
    passing = targets.mfu_1b([train_row("xla", 0.1), train_row("fused", 0.45)], FULL)
    assert passing["met"] is True and passing["measured"] == 0.45
    assert passing["reason"] == "passes (needs >= 40%): 45.0% MFU"
    assert passing["rule"].startswith("model/1b training step at 32768 tokens")

    failing = targets.mfu_1b([train_row("fused", 0.312), train_row("xla", 0.5)], FULL)
    assert failing["met"] is False and failing["reason"] == "fails (needs >= 40%): 31.2% MFU"

    not_run = targets.mfu_1b([train_row("xla", 0.5)], FULL)
    assert not_run["met"] is None and not_run["reason"] == "fused training step not run"
    errored = targets.mfu_1b([{"kernel": "fused", "seq_len": 32768, "error": "ValueError: bad"}], FULL)
    assert errored["met"] is None and errored["reason"] == "fused training step error: ValueError: bad"
    no_peak = targets.mfu_1b([train_row("fused", None)], FULL)
    assert no_peak["met"] is None and no_peak["reason"].startswith("no peak FLOP/s")


def test_targets_table_shows_each_verdict_and_its_reason():
    t = targets.evaluate_targets(
        [attention_row("cudnn", 500e12), attention_row("fused", 250e12)], [train_row("fused", 0.45)], FULL
    )
    lines = report.targets_table(t).splitlines()
    assert len(lines) == 4
    assert "fails (needs >= 0.8x cuDNN): 0.50x cuDNN" in lines[2] and lines[2].rstrip(" |").endswith("NO")
    assert "passes (needs >= 40%): 45.0% MFU" in lines[3] and lines[3].rstrip(" |").endswith("yes")
    errored = {"impl": "fused", "seq_len": 32768, "causal": True, "error": "a | b"}
    assert "n/a" in report.targets_table(targets.evaluate_targets([errored], [], FULL))
    assert "a / b" in report.targets_table(targets.evaluate_targets([errored], [], FULL))  # no stray column


def test_decoding_keeps_up_verdict_on_synthetic_rows():
    def row(encode, decode, workers=15):
        rows = [{"workers": w, "frames_per_s": f} for w, f in decode.items()]
        return {"encode": [{"batch": b, "frames_per_s": f} for b, f in encode.items()],
                "decode": {"workers": workers, "rows": rows}}  # fmt: skip

    fast = row({8: 900.0, 64: 2400.0}, {1: 30.0, 15: 420.0})
    vqgan_encode.derive_keeps_up(fast)
    assert (
        fast["keeps_up"] is False and fast["encode_frames_per_s"] == 2400.0 and fast["workers_needed"] == 80
    )
    assert fast["decode_frames_per_s"] == 420.0
    slow = row({8: 300.0}, {1: 30.0, 15: 420.0})
    vqgan_encode.derive_keeps_up(slow)
    assert slow["keeps_up"] is True and slow["workers_needed"] == 10
    missing = {"encode": [{"batch": 8, "skipped": "..."}], "decode": {"skipped": "not measured: no decord"}}
    vqgan_encode.derive_keeps_up(missing)
    assert missing["keeps_up"] is None and missing["workers_needed"] is None
    text = report.vqgan_text({**fast, "decode": {**fast["decode"], "clip": "1280x720", "sample_fps": 1.0,
                                                  "cpus": 16}})  # fmt: skip
    assert "Decoding keeps up with the encode: NO (420 against 2400 frames/s; about 80 workers would)" in text
    assert "Decode skipped: not measured: no decord" in report.vqgan_text(missing)


def test_gpu_check_maps_the_checkout_packages_without_an_install():
    """With only PYTHONPATH (what scripts/gpu_check.sh sets on a bare machine), lvm.tokenizers and
    lvm.data_pipeline resolve once the package is imported, and the decode half says it cannot start workers."""
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in (getattr(f, '__module__', '') or '')]\n"
        "try:\n"
        "    import lvm.data_pipeline\n"
        "    raise SystemExit('lvm.data_pipeline resolved without the mapping')\n"
        "except ModuleNotFoundError:\n"
        "    pass\n"
        "import lvm.bench.gpu as gpu, lvm.data_pipeline.decode, lvm.tokenizers.config\n"
        "assert gpu.MAPPED == ['lvm.tokenizers', 'lvm.data_pipeline'], gpu.MAPPED\n"
        "print(lvm.data_pipeline.decode.__file__, lvm.tokenizers.config.__file__)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [
        str(REPO / "data_pipeline" / "decode.py"),
        str(REPO / "tokenizers" / "config.py"),
    ]
