"""The outlier suite's claims, at a size CI can afford (K = 1024)."""

import pytest

from benchmarks.fidelity_synthetic import activations, evaluate, weights

M, K, N = 128, 1024, 128


@pytest.fixture(scope="module")
def w():
    return weights(N, K)


def _sqnr(act, scheme, kind, group, w):
    return evaluate(activations(act, M, K), w, scheme, kind, group)[1]


@pytest.mark.parametrize("act", ["row offsets", "mixed (DiT-like)"])
def test_regular_beats_sylvester_on_row_offsets(act, w):
    reg = _sqnr(act, "w4a4", "regular", 256, w)
    syl = _sqnr(act, "w4a4", "sylvester", 256, w)
    assert reg > syl + 2.0  # dB


@pytest.mark.parametrize("act", ["channel outliers", "heavy tails"])
def test_regular_matches_sylvester_without_row_offsets(act, w):
    reg = _sqnr(act, "w4a4", "regular", 256, w)
    syl = _sqnr(act, "w4a4", "sylvester", 256, w)
    assert abs(reg - syl) < 1.0


def test_rotation_beats_none_and_larger_groups_help_on_channel_outliers(w):
    none = _sqnr("channel outliers", "w4a4", "none", 256, w)
    g16 = _sqnr("channel outliers", "w4a4", "regular", 16, w)
    g256 = _sqnr("channel outliers", "w4a4", "regular", 256, w)
    assert none + 3 < g16 < g256


def test_w8a8_far_better_than_w4a4(w):
    for act in ("gaussian", "mixed (DiT-like)"):
        assert _sqnr(act, "w8a8", "regular", 256, w) > _sqnr(act, "w4a4", "regular", 256, w) + 15
