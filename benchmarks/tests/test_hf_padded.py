import json

import pytest

from benchmarks import hf_padded


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_prefill_is_sparse_and_equal_to_each_sequence_alone(tmp_path, side):
    lengths = [300, 170, 90]
    args = [
        "--device", "cpu", "--tiny", "--layers", "2", "--lengths", *map(str, lengths),
        "--side", side, "--config", "min_keys=0,segment_size=64", "--repeats", "1",
        "--out", str(tmp_path),
    ]  # fmt: skip
    assert hf_padded.main(args) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "hf_padded.json").read_text())["rows"]}
    assert set(rows) == {"s2o", "alone", "sdpa"}
    assert rows["s2o"]["sparse_calls"] == 2 * len(lengths)  # every sequence sparse in each layer
    assert rows["s2o"]["worst_seq_vs_alone"] < 1e-5
    assert rows["sdpa"]["worst_seq_vs_alone"] < 1e-4
