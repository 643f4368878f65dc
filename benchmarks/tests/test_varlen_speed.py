import json

import torch

from benchmarks import varlen_speed


def test_paged_cache_holds_every_sequence_in_its_pages():
    lengths = [70, 16, 33]
    k, v = torch.randn(sum(lengths), 2, 8), torch.randn(sum(lengths), 2, 8)
    k_pages, v_pages, table = varlen_speed.paged_cache(k, v, lengths, page_size=16)
    assert k_pages.shape == (5 + 1 + 3, 16, 2, 8) and table.dtype == torch.int32
    assert sorted(table[table >= 0].unique().tolist())[-1] == k_pages.shape[0] - 1
    start = 0
    for b, n in enumerate(lengths):
        pages = table[b, : -(-n // 16)].long()
        for packed, paged in ((k, k_pages), (v, v_pages)):
            assert torch.equal(paged[pages].flatten(0, 1)[:n], packed[start : start + n])
        start += n


def test_cpu_run_measures_every_method(tmp_path):
    out = tmp_path / "varlen"
    args = [
        "--device", "cpu", "--lengths", "700", "300", "129", "--q-heads", "4", "--kv-heads", "2",
        "--head-dim", "64", "--page-size", "16", "--config", "min_keys=0", "--repeats", "1",
        "--out", str(out),
    ]  # fmt: skip
    assert varlen_speed.main(args) == 0
    rows = {r["method"]: r for r in json.loads((out / "varlen_speed.json").read_text())["rows"]}
    assert set(rows) == {"sdpa", "s2o", "s2o-paged"}
    assert rows["sdpa"]["rel_err"] < varlen_speed.EXACT_TOLERANCE
    assert rows["s2o"]["sparse_seqs"] == "3/3" and 0 < rows["s2o"]["density"] <= 1
    # Paged K/V give the same attention as packed K/V.
    for key in ("rel_err", "worst_head", "worst_seq", "density"):
        assert rows["s2o-paged"][key] == rows["s2o"][key]
    assert all(r["ms"] > 0 and r["vs_sdpa"] > 0 for r in rows.values())


def test_flex_document_mask_equals_attention_per_sequence():
    # The block mask is built from block indices; on the CPU FlexAttention runs it compiled.
    lengths = [512, 128, 384]
    q, k, v, _ = varlen_speed.packed_batch(
        lengths, q_heads=4, kv_heads=2, head_dim=64, device="cpu", dtype=torch.float32
    )
    out = varlen_speed.flex_document(lengths, "cpu")(q, k, v)
    expected = varlen_speed.dense_per_sequence(None, lengths)(q, k, v)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
