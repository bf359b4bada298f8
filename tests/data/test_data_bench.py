"""`lvm bench data --quick` runs end to end and writes its JSON."""

import json

import pytest

from lvm import cli

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
