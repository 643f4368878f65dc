"""benchmarks.model_e2e on the trained model on the CPU: SmolLM2-135M-Instruct (s2o.models) copies
a span of real text (s2o.texts) as well with s2o inside the model as with dense SDPA. The model is
loaded once for the module."""

from __future__ import annotations

import pytest
import torch

from s2o import models, texts

_MISSING = models.missing_packages()
if _MISSING:
    pytest.skip(
        f"SmolLM2 needs {', '.join(_MISSING)} (not installed): {models.INSTALL_COMMAND}",
        allow_module_level=True,
    )

from benchmarks import model_e2e  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    return models.load_smollm2(dtype=torch.float32)


def test_copy_accuracy_with_s2o_within_one_position_of_dense_at_2k(smollm2):
    model, tokenizer = smollm2
    prose = texts.load_text("prose")
    ids, rows, targets = model_e2e.copy_input(tokenizer, prose, 2048, seed=0, name="prose")
    config = model_e2e.s2o_config({})
    dense, sparse, calls, _, _ = model_e2e.dense_and_s2o_hidden(model, ids, config, "copy")
    assert calls["all_layers_sparse"]
    metrics = model_e2e.next_token_metrics(model, dense, sparse, rows, targets)
    positions = metrics["positions"]
    assert positions == model_e2e.COPY_SPAN - 1
    hits_dense = round(metrics["acc_dense"] * positions)
    hits_s2o = round(metrics["acc_s2o"] * positions)
    assert hits_dense >= 0.75 * positions  # the model does copy (measured: 206 of 255)
    # s2o is not exact at 2K (density ~0.9 at the defaults): on ~2% of the copy positions the
    # argmax flips between close candidates (top-1 agreement 0.98), so one position either way
    # is allowed. Measured at the defaults: seed 0 (tested) 206 dense against 205 s2o (with
    # ordering="kv_head" seeds 1 and 2 gave 212 / 212 and 210 / 209; at threshold 0.012 212 /
    # 210 and 210 / 206). At 4K and 8K s2o loses more (benchmarks/model_e2e.py, README).
    assert abs(hits_s2o - hits_dense) <= 1, (hits_dense, hits_s2o, metrics["top1_agree"])
