"""Smoke test of `lvm bench attention --quick`: it runs and writes valid JSON, a PNG and a markdown table.

Timings are not asserted (time-shared CPU cores); only structure and the deterministic memory facts. The public
reference implementation runs only where `.venv-ref` exists (scripts/setup_reference_env.sh).
"""

from __future__ import annotations

import json

from lvm.bench import attention, common
from lvm.cli import main


def test_model_flops_counts_causal_as_half():
    full = attention.model_flops(1024, heads=4, head_dim=64, batch=2, causal=False)
    assert full == 3 * 4 * 1024**2 * 64 * 4 * 2
    assert attention.model_flops(1024, heads=4, head_dim=64, batch=2, causal=True) == full / 2


def test_markdown_table_shape():
    table = common.markdown_table(["a", "b"], [[1, "x"], [22, "yy"]]).splitlines()
    assert len(table) == 4 and all(line.startswith("|") and line.endswith("|") for line in table)
    assert table[1].replace("|", "").replace("-", "").replace(":", "").strip() == ""


def test_bench_attention_quick_writes_json_and_png(tmp_path):
    with_reference = attention.DEFAULT_REFERENCE_PYTHON.exists()
    argv = ["bench", "attention", "--quick", "--out", str(tmp_path)]
    if not with_reference:
        argv.append("--no-reference")
    assert main(argv) == 0

    data = json.loads((tmp_path / "attention.json").read_text())
    assert data["machine"]["backend"] and data["machine"]["cpu_count"] >= 1
    assert data["machine"]["device_count"] == 8
    assert data["matmul"]["flops_per_s"] > 0
    assert any("simulated" in note for note in data["notes"])

    ours = [r for r in data["results"] if r["series"] != "reference"]
    assert not [r for r in ours if r.get("error")]
    assert {r["series"] for r in ours} == {"dense", "blockwise", "ring-zigzag", "ring-contiguous", "ring"}
    assert {r["sp"] for r in ours} == {1, 8}
    assert {r["seq_len"] for r in ours} == set(data["settings"]["seq_lens"])
    for r in ours:
        assert r["time_s"] > 0 and r["flops_per_s"] > 0 and r["matmul_fraction"] > 0
        assert r["memory"]["temp_bytes"] > 0 and r["memory"]["per_device_bytes"] > 0

    # Arguments are sharded along the sequence: each of 8 devices holds 1/8 of q, k, v and the cotangent.
    s = max(data["settings"]["seq_lens"])
    one = next(r for r in ours if r["series"] == "blockwise" and r["seq_len"] == s and r["causal"])
    ring = next(r for r in ours if r["series"] == "ring-zigzag" and r["seq_len"] == s and r["sp"] == 8)
    assert ring["memory"]["argument_bytes"] * 8 == one["memory"]["argument_bytes"]

    for name in ("causal_about_half", "ring_no_slower_than_blockwise", "attention_60pct_of_matmul"):
        assert isinstance(data["targets"][name]["met"], bool)
    reference_rows = [r for r in data["results"] if r["series"] == "reference"]
    if with_reference:
        assert data["reference"]["run"], data["reference"]
        assert reference_rows and all(r["time_s"] > 0 for r in reference_rows)
        assert isinstance(data["targets"]["faster_and_leaner_than_reference"]["met"], bool)
    else:
        assert not reference_rows and data["targets"]["faster_and_leaner_than_reference"]["met"] is None

    assert (tmp_path / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| seq |" in (tmp_path / "attention.md").read_text()
