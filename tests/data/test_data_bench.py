"""`lvm bench data --quick` runs end to end and writes its JSON; the decode scaling target on synthetic rows."""

import json

import pytest

from lvm import cli
from lvm.bench.data import decode_scaling

pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")


@pytest.mark.slow
def test_bench_data_quick(tmp_path):
    assert cli.main(["bench", "data", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "data.json").read_text())
    assert (
        result["decode"]["ffmpeg_raw_frames_per_s"] > 0 and result["decode"]["pipeline_all_frames_per_s"] > 0
    )
    for key in ("loader_disk", "loader_gcs"):
        assert result[key]["tokens_per_s"] > 0
    assert result["training_consumption"]["tokens_per_s_per_host"] > 0
    workers = result["decode_workers"]
    assert [r["workers"] for r in workers["rows"]][:2] == [1, 2] and workers["cpus"] >= 1
    assert all(
        r["frames"] == 12 and r["frames_per_s"] > 0 and r["workers_cpu_s"] > 0 for r in workers["rows"]
    )
    assert workers["target"]["met"] in (True, False, None) and workers["target"]["reason"]
    e2e = result["decode_encode"]
    assert e2e["before"]["frames"] == 12 and all(r["frames"] == 12 for r in e2e["after"])
    settings = result["decode_settings"]["rows"]
    assert len(settings) == 8 and all(r["frames_per_cpu_s"] > 0 for r in settings.values())
    assert settings["1 fps reading every frame in order (skip_frames + next)"]["identical"]
    assert result["machine"]["cpu_model"] and len(result["load_average_end"]) == 3


def rows(*rates):
    return [{"workers": w, "frames_per_s": fps} for w, fps in rates]


def test_decode_scaling_target_on_synthetic_rows():
    passing = decode_scaling(rows((1, 10.0), (2, 17.0), (4, 30.0), (8, 31.0)), cpus=4)  # 8 is past the CPUs
    assert passing["met"] is True
    assert passing["reason"] == (
        "passes (needs >= 0.5 x the ideal gain per step): 1 -> 2 workers 1.70x (needs 1.50x); "
        "2 -> 4 workers 1.76x (needs 1.50x)"
    )
    flat = decode_scaling(rows((1, 10.0), (2, 12.0), (4, 30.0)), cpus=4)
    assert flat["met"] is False
    assert (
        flat["reason"] == "fails (needs >= 0.5 x the ideal gain per step): 1 -> 2 workers 1.20x (needs 1.50x)"
    )
    slower = decode_scaling(
        rows((2, 20.0), (1, 10.0), (3, 19.0)), cpus=3
    )  # any order; 3 workers slower than 2
    assert slower["met"] is False and "2 -> 3 workers 0.95x (needs 1.25x)" in slower["reason"]
    one_cpu = decode_scaling(rows((1, 10.0), (2, 11.0)), cpus=1)
    assert one_cpu["met"] is None and one_cpu["reason"] == "needs two worker counts within the 1 CPUs"
    assert "up to the 4 CPUs" in passing["rule"]
