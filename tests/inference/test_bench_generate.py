"""`lvm bench generate --quick`: positive throughputs of both decode loops, a second question on a cached video is
cheaper than encoding and prefilling the video again, the targets are judged and saved; the target functions on
synthetic rows that pass and fail."""

import json

from lvm.bench.generate import markdown, text_tokens_5x, vision_codes_10x
from lvm.cli import run_command


def test_quick_generate_bench(tmp_path):
    argv = ["generate", "--quick", "--contexts", "256", "--sp", "1", "2", "--batches", "1", "2",
            "--new-tokens", "8", "--frames", "1", "--video-frames", "2", "--reps", "1", "--out", str(tmp_path)]  # fmt: skip
    assert run_command("bench", argv) == 0
    payload = json.loads((tmp_path / "generate.json").read_text())
    assert [(r["sp"], r["context"]) for r in payload["results"]] == [(1, 256), (2, 256)]
    assert all(r["prefill_tokens_per_s"] > 0 and r["padded"] >= r["context"] for r in payload["results"])
    settings = {(r["sp"], r["batch"], r["impl"]) for r in payload["decode"]}
    assert settings == {(sp, b, impl) for sp in (1, 2) for b in (1, 2) for impl in ("host", "device")}
    assert all(r["tokens_per_s"] > 0 for r in payload["decode"])
    assert {r["impl"] for r in payload["vision"]} == {"host", "device"}
    assert all(r["codes_per_s"] > 0 and r["frame_s"] > 0 and r["sp"] == 1 for r in payload["vision"])
    second = payload["second_question"]
    assert 0 < second["cached_s"] < second["scratch_s"] and second["cached_host_s"] > 0 and second["sp"] == 2
    assert set(payload["targets"]) == {"text_tokens_5x", "vision_codes_10x"}
    assert all(t["met"] in (True, False) for t in payload["targets"].values())  # measured, whatever the load
    assert payload["machine"]["cpu_model"] and payload["decode_chunk"] >= 1
    text = (tmp_path / "generate.md").read_text()
    assert "device tokens/s" in text and "Machine:" in text and "## Targets" in text


def decode_row(impl, tokens_per_s, sp=1, context=256, batch=1):
    return {
        "impl": impl,
        "sp": sp,
        "context": context,
        "batch": batch,
        "tokens_per_s": tokens_per_s,
        "cpu_s": 1.0,
    }


def test_text_target_is_judged_at_batch_1_the_smallest_sp_and_short_contexts():
    rows = [decode_row("host", 1000), decode_row("device", 6000), decode_row("host", 1000, context=1024),
            decode_row("device", 5100, context=1024)]  # fmt: skip
    noise = [
        decode_row("host", 1000, batch=8),
        decode_row("device", 1100, batch=8),  # batch 8: not judged
        decode_row("host", 500, sp=4),
        decode_row("device", 600, sp=4),  # a larger sp: not judged
        decode_row("host", 300, context=16384),
        decode_row("device", 600, context=16384),
    ]  # listed only
    met = text_tokens_5x(rows + noise)
    assert met["met"] is True and "6.0x" in met["reason"] and "5.1x" in met["reason"]
    assert [r["context"] for r in met["all_contexts"]] == [256, 1024, 16384]
    failed = text_tokens_5x([*rows[:3], decode_row("device", 4000, context=1024), *noise])
    assert failed["met"] is False and "context=1024" in failed["reason"] and "4.0x" in failed["reason"]
    assert "context=256" not in failed["reason"]  # the reason names the failing setting
    assert text_tokens_5x([decode_row("device", 6000)])["met"] is None  # nothing to compare with


def test_vision_target_compares_codes_per_second_at_batch_1():
    row = lambda impl, codes: {"impl": impl, "sp": 1, "batch": 1, "codes_per_s": codes, "cpu_s": 2.0}
    assert vision_codes_10x([row("host", 300), row("device", 3300)])["met"] is True
    failed = vision_codes_10x([row("host", 300), row("device", 2700)])
    assert failed["met"] is False and "9.0x" in failed["reason"]
    assert vision_codes_10x([])["met"] is None


def test_markdown_pairs_the_loops():
    from lvm.bench.generate import evaluate_targets

    decode = [decode_row("host", 1000), decode_row("device", 6000)]
    vision = [{"impl": impl, "sp": 1, "batch": 1, "codes_per_s": c, "cpu_s": 1.0, "codes_per_frame": 64,
               "frame_s": f} for impl, c, f in (("host", 300, 0.5), ("device", 3300, 0.05))]  # fmt: skip
    machine = {"cpu_model": "CPU", "cpu_affinity": 2, "cpu_count": 2, "jax_version": "0", "backend": "cpu",
               "device_count": 8, "simulated_cpu_devices": True, "device_kind": "cpu"}  # fmt: skip
    second = {"sp": 1, "frames": 2, "prompt_tokens": 100, "cached_s": 0.004, "cached_host_s": 0.005,
              "scratch_s": 0.04, "encode_s": 0.01, "speedup": 10.0}  # fmt: skip
    payload = {"model": "model/tiny", "date": "today", "machine": machine, "load_average": [1.0], "notes": [],
               "results": [], "decode": decode, "vision": vision, "second_question": second,
               "targets": evaluate_targets(decode, vision)}  # fmt: skip
    text = markdown(payload)
    assert "1000" in text and "6000" in text and "6.0x" in text and "11.0x" in text and "CPU, 2 cores" in text
