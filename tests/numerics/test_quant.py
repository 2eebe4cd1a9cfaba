import pytest
import torch

from convrot_compiler.numerics.quant import (
    PACK_TILES_ROWS,
    dequantize,
    pack_int4,
    pack_int4_tiles,
    pack_int8_tiles,
    pack_values,
    quantize_activation,
    quantize_symmetric,
    quantize_weight,
    reference_linear,
    relayout,
    unpack_int4,
    unpack_int4_tiles,
    unpack_int8_tiles,
    unpack_values,
)
from convrot_compiler.numerics.rotations import GroupHadamardRotation, make_rotation


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_pack_round_trip_covers_all_sixteen_values():
    vals = torch.arange(-8, 8, dtype=torch.int8)
    q = torch.stack([vals.roll(i) for i in range(16)]).repeat(1, 2)  # [16, 32]
    packed = pack_int4(q, 16)
    assert packed.shape == (16, 16) and packed.dtype == torch.int8
    assert torch.equal(unpack_int4(packed, 16), q)


def test_pack_layout_first_half_of_group_low_nibble_second_half_high_nibble():
    q = torch.tensor([[1, 2, -3, 4, 5, -6, 7, -8]], dtype=torch.int8)  # one group of 8
    b = pack_int4(q, 8).view(torch.uint8)
    assert b.tolist() == [[1 | (5 << 4), 2 | ((-6 & 0xF) << 4), (-3 & 0xF) | (7 << 4), 4 | ((-8 & 0xF) << 4)]]


def _mma_emulation(x: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """x [M <= 8, K] @ W^T as the tensor-core kernel computes it, written from PTX's m16n8k16 fragment
    rules (not from pack_int4_tiles): lane (g, t) = (lane // 4, lane % 4) holds A elements a0..a7 at
    row g + 8 ((i // 2) % 2), column 2t + i % 2 + 8 (i // 4), register i // 2 = nibbles (i // 2, i // 2 + 4)
    of its word decoded as nibble - 8; B elements b0..b3 at row 2t + i % 2 + 8 (i // 2), column g,
    which the kernel loads as x[16t + 4s + i] of the 64-input chunk."""
    nb, kc = tiles.shape[:2]
    m = x.shape[0]
    out = torch.zeros(m, nb * 16, dtype=torch.float64)
    words = tiles.to(torch.int64) & 0xFFFFFFFF
    for b in range(nb):
        for c in range(kc):
            for s in range(4):
                a = torch.zeros(16, 16, dtype=torch.float64)
                bm = torch.zeros(16, 8, dtype=torch.float64)
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    w = int(words[b, c, lane, s])
                    for i in range(8):
                        r = i // 2
                        nibble = (w >> (4 * (r + 4 * (i % 2)))) & 0xF
                        a[g + 8 * (r % 2), 2 * t + i % 2 + 8 * (i // 4)] = nibble - 8
                    for i in range(4):
                        if g < m:
                            bm[2 * t + i % 2 + 8 * (i // 2), g] = x[g, 64 * c + 16 * t + 4 * s + i]
                out[:, 16 * b:16 * b + 16] += (a @ bm).T[:m]
    return out


def test_tile_layout_is_what_the_mma_fragments_read():
    torch.manual_seed(0)
    q = torch.randint(-8, 8, (24, 128), dtype=torch.int8)  # 2 tiles of rows (the second half padding), 2 chunks
    x = torch.randn(3, 128, dtype=torch.float64)
    out = _mma_emulation(x, pack_int4_tiles(q))
    torch.testing.assert_close(out[:, :24], x @ q.double().T)
    assert torch.equal(out[:, 24:], torch.zeros(3, 8, dtype=torch.float64))


def _mma8_emulation(x: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """x [M <= 8, K] @ W^T as the int8 tensor-core kernel computes it, from PTX's m16n8k16 fragment rules and
    the kernel's decoding (not from pack_int8_tiles): A register r of a step is bytes (2 (r // 2) + r % 2,
    + 2) of the lane's double word (the nibbles at bit 8 (r % 2) of word r // 2), holding a_2r and a_2r+1;
    a_e sits at row g + 8 ((e // 2) % 2) and column 2t + e % 2 + 8 (e // 4), which meets the activation
    b_{e % 2 + 2 (e // 4)} = x[16t + 4s + e % 2 + 2 (e // 4)] of the chunk; a byte u decodes to
    (16 (u >> 4) - 256) + (128 + (u & 15))."""
    nb, kc = tiles.shape[:2]
    out = torch.zeros(x.shape[0], nb * 16, dtype=torch.float64)
    byte_of = [0, 2, 1, 3, 4, 6, 5, 7]
    for b in range(nb):
        for c in range(kc):
            for lane in range(32):
                g, t = divmod(lane, 4)
                for s in range(4):
                    word = int(tiles[b, c, lane, s]) & 0xFFFFFFFFFFFFFFFF
                    for e in range(8):
                        u = (word >> (8 * byte_of[e])) & 0xFF
                        value = (16 * (u >> 4) - 256) + (128 + (u & 15))
                        row = 16 * b + g + 8 * ((e // 2) % 2)
                        out[:, row] += value * x[:, 64 * c + 16 * t + 4 * s + e % 2 + 2 * (e // 4)]
    return out


def test_int8_tile_layout_is_what_the_mma_fragments_read():
    torch.manual_seed(0)
    q = torch.randint(-128, 128, (24, 128), dtype=torch.int8)  # 2 tiles of rows (the second half padding)
    q[0, :4] = torch.tensor([-128, 127, 0, -1])
    x = torch.randn(3, 128, dtype=torch.float64)
    tiles = pack_int8_tiles(q)
    assert tiles.shape == (2, 2, 32, 4) and tiles.dtype == torch.int64
    out = _mma8_emulation(x, tiles)
    torch.testing.assert_close(out[:, :24], x @ q.double().T)
    assert torch.equal(out[:, 24:], torch.zeros(3, 8, dtype=torch.float64))
    assert torch.equal(unpack_int8_tiles(tiles, 24), q)
    assert torch.equal(unpack_int8_tiles(tiles, 32)[24:], torch.zeros(8, 128, dtype=torch.int8))


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16"])
def test_weight_only_layouts_compute_the_same_linear(scheme):
    torch.manual_seed(1)
    w, x = torch.randn(40, 200) * 0.05, torch.randn(3, 200)
    groups = quantize_weight(w, scheme, None, group_size=64)
    tiles = quantize_weight(w, scheme, None, group_size=64, layout="tiles")
    bits = groups.weight_bits
    assert tiles.layout == "tiles" and tiles.values.dtype == (torch.int32 if bits == 4 else torch.int64)
    assert torch.equal(tiles.int_values(), groups.int_values())
    assert torch.equal(relayout(groups, layout="tiles").values, tiles.values)
    assert torch.equal(relayout(tiles, layout="groups").values, groups.values)
    assert torch.equal(unpack_values(pack_values(groups.int_values(), bits, 64, "tiles"), bits, 64, 40),
                       groups.int_values())
    torch.testing.assert_close(reference_linear(x, tiles), reference_linear(x, groups), rtol=0, atol=0)
    with pytest.raises(ValueError, match="tile layout is for w4a16 and w8a16"):
        quantize_weight(w, scheme, None, group_size=32, layout="tiles")


def test_tile_pack_round_trip_and_padding():
    vals = torch.arange(-8, 8, dtype=torch.int8)
    q = torch.stack([vals.roll(i) for i in range(16)]).repeat(3, 12)[:37]  # [37, 192]: ragged N
    tiles = pack_int4_tiles(q)
    assert tiles.shape == (3, 3, 32, 4) and tiles.dtype == torch.int32
    assert torch.equal(unpack_int4_tiles(tiles, 37), q)
    assert torch.equal(unpack_int4_tiles(tiles, 48)[37:], torch.zeros(11, 192, dtype=torch.int8))


def test_tile_pack_of_many_rows_is_one_block_of_rows_after_another():
    torch.manual_seed(0)
    n = PACK_TILES_ROWS + 21  # a ragged last block, packed apart from the first
    q = torch.randint(-8, 8, (n, 64), dtype=torch.int8)
    tiles = pack_int4_tiles(q)
    assert tiles.shape == (-(-n // 16), 1, 32, 4)
    assert torch.equal(unpack_int4_tiles(tiles, n), q)
    x = torch.randn(2, 64, dtype=torch.float64)
    tail = slice(PACK_TILES_ROWS - 16, None)  # the tile before the block boundary and the ragged ones after it
    torch.testing.assert_close(_mma_emulation(x, tiles[tail.start // 16:])[:, :37], x @ q[tail].double().T)


def test_tile_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 64"):
        pack_int4_tiles(torch.zeros(16, 96, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4_tiles(torch.full((16, 64), -9, dtype=torch.int8))
    with pytest.raises(TypeError):
        pack_int4_tiles(torch.zeros(16, 64))
    with pytest.raises(ValueError, match="do not hold"):
        unpack_int4_tiles(pack_int4_tiles(torch.zeros(16, 64, dtype=torch.int8)), 17)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple"):
        pack_int4(torch.zeros(2, 12, dtype=torch.int8), 8)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((1, 8), 9, dtype=torch.int8), 8)
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(1, 8), 8)


@pytest.mark.parametrize("bits,qmax", [(4, 7), (8, 127)])
def test_quantization_error_within_half_a_step(bits, qmax):
    x = torch.randn(64, 96) * torch.logspace(-3, 2, 64)[:, None]
    q, s = quantize_symmetric(x, bits)
    assert q.abs().max() <= qmax and q.dtype == torch.int8
    err = (dequantize(q, s) - x).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5)).all()
    # the absmax element of each row lands exactly on +-qmax
    assert (q.abs().amax(dim=-1) == qmax).all()


def test_zero_and_constant_rows():
    x = torch.zeros(3, 16)
    x[1] = 2.5
    x[2] = -1.0
    q, s = quantize_symmetric(x, 4)
    assert s[0] == 0 and (q[0] == 0).all() and not torch.isnan(dequantize(q, s)).any()
    assert (q[1] == 7).all() and (q[2] == -7).all()
    torch.testing.assert_close(dequantize(q, s), x)


def test_non_finite_row_gives_nan_scale_and_leaves_others_alone():
    x = torch.randn(3, 16)
    x[0, 3] = float("nan")
    x[2, 0] = float("inf")
    q, s = quantize_symmetric(x, 4)
    assert torch.isnan(s[0]) and torch.isnan(s[2]) and (q[0] == 0).all() and (q[2] == 0).all()
    q1, s1 = quantize_symmetric(x[1:2], 4)
    assert torch.equal(q[1], q1[0]) and s[1] == s1[0]


def _offset_tokens(m=64, k=1024, seed=0):
    """DiT-like activations: tokens with a large common offset (row outliers) plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    offsets = torch.zeros(m, 1)
    offsets[::4] = 2.0 + 2.0 * torch.rand(m // 4, 1, generator=g)
    return x + offsets


def _rotated_quant_error(x, kind):
    rot = GroupHadamardRotation(kind, 256)
    xr = rot.apply(x)
    q, s = quantize_symmetric(xr, 4)
    return _rel(dequantize(q, s), xr), xr.abs().max().item()


def test_regular_rotation_beats_sylvester_on_row_offset_outliers():
    x = _offset_tokens()
    err_reg, max_reg = _rotated_quant_error(x, "regular")
    err_syl, max_syl = _rotated_quant_error(x, "sylvester")
    # Sylvester turns the offset into one spike per group (sqrt(256) = 16x the offset): the paper's 14.5 -> 106 vs 9.3
    assert max_syl > 5 * max_reg
    assert err_reg < 0.5 * err_syl


@pytest.mark.parametrize("scheme", ["w4a4", "w8a8"])
@pytest.mark.parametrize("m,k", [(1, 256), (7, 300), (33, 512)])
def test_reference_linear_matches_dequantized_math(scheme, m, k):
    g = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(24, k, generator=g) * 0.05
    b = torch.randn(24, generator=g)
    rot = make_rotation("regular", 256)
    qw = quantize_weight(w, scheme, rot)
    bits = 4 if scheme == "w4a4" else 8
    qa, sa = quantize_activation(x, bits, rot)
    expect = dequantize(qa, sa) @ dequantize(qw.int_values(), qw.scale).T + b
    out = reference_linear(x, qw, b)
    assert out.shape == (m, 24)
    torch.testing.assert_close(out, expect, atol=1e-4, rtol=1e-4)


def test_reference_linear_keeps_dtype_and_leading_dims():
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    qw = quantize_weight(torch.randn(16, 256), "w4a4", make_rotation("regular"))
    out = reference_linear(x, qw)
    assert out.shape == (2, 3, 16) and out.dtype == torch.bfloat16


def test_w8a8_error_far_below_w4a4():
    g = torch.Generator().manual_seed(1)
    x = _offset_tokens(32, 768, seed=2)
    w = torch.randn(48, 768, generator=g) * 0.02
    ref = x @ w.T
    rot = make_rotation("regular")
    e4 = _rel(reference_linear(x, quantize_weight(w, "w4a4", rot)), ref)
    e8 = _rel(reference_linear(x, quantize_weight(w, "w8a8", rot)), ref)
    assert e8 < e4 / 10 and e4 < 0.2


def test_w4a16_weight_only_is_close_and_has_group_scales():
    w = torch.randn(40, 600) * 0.02
    x = torch.randn(3, 600)
    qw = quantize_weight(w, "w4a16", None, group_size=256)
    assert qw.scale.shape == (40, 3) and qw.values.shape == (40, 384)
    assert _rel(reference_linear(x, qw), x @ w.T) < 0.15


def test_quantize_weight_errors():
    with pytest.raises(ValueError, match="unknown scheme"):
        quantize_weight(torch.randn(4, 256), "w2a2", make_rotation("regular"))
    with pytest.raises(ValueError, match="needs a rotation"):
        quantize_weight(torch.randn(4, 256), "w4a4", None)
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(4), "w4a4", make_rotation("regular"))


def test_zero_activation_rows_give_bias_not_nan():
    qw = quantize_weight(torch.randn(8, 256), "w4a4", make_rotation("regular"))
    b = torch.randn(8)
    out = reference_linear(torch.zeros(2, 256), qw, b)
    torch.testing.assert_close(out, b.expand(2, 8))
