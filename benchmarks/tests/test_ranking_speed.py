import json

from benchmarks import ranking_speed


def test_cpu_run_times_both_ops(tmp_path):
    args = ["--device", "cpu", "--lengths", "1000", "--repeats", "1", "--out", str(tmp_path)]
    assert ranking_speed.main(args) == 0
    (row,) = json.loads((tmp_path / "ranking_speed.json").read_text())["rows"]
    assert row["lists"] == ranking_speed.GROUP  # the default ranks per query head
    assert row["estimate_ms"] > 0 and row["permute_ms"] > 0 and row["scores_gib"] > 0
