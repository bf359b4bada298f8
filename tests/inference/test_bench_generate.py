"""`lvm bench generate --quick`: positive throughputs, and a second question on a cached video is cheaper than
encoding and prefilling the video again."""

import json

from lvm.cli import run_command


def test_quick_generate_bench(tmp_path):
    argv = ["generate", "--quick", "--contexts", "256", "--sp", "1", "2", "--out", str(tmp_path)]
    assert run_command("bench", argv) == 0
    payload = json.loads((tmp_path / "generate.json").read_text())
    assert [(r["sp"], r["context"]) for r in payload["results"]] == [(1, 256), (2, 256)]
    for r in payload["results"]:
        assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["padded"] >= r["context"]
    second = payload["second_question"]
    assert 0 < second["cached_s"] < second["scratch_s"] and second["sp"] == 2
    assert "tokens/s" in (tmp_path / "generate.md").read_text()
