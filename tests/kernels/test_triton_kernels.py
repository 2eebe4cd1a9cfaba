"""Triton kernels against the reference custom_ops. On CPU they run through the Triton
interpreter (conftest sets TRITON_INTERPRET=1), on small shapes."""

import pytest
import torch

from convrot_compiler.kernels.triton.common import interpreting
from convrot_compiler.kernels.triton.int_gemm import int_gemm
from convrot_compiler.kernels.triton.rotate_quant import rotate_quantize
from convrot_compiler.kernels.triton.weight_only import w4a16_gemm
from convrot_compiler.numerics.hadamard import hadamard_matrix
from convrot_compiler.numerics.quant import pack_int4, quantize_weight
from convrot_compiler.numerics.rotations import GroupHadamardRotation
from convrot_compiler.ops import custom_ops, dispatch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _int_valued(m, k, seed, lo=-8, hi=9):
    """Integer-valued activations: every rotation below is then exact in float32 whatever the summation
    order, so kernel and reference must agree bit for bit on the quantized integers."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (m, k), generator=g).float()


ROTATIONS = [("regular", 256), ("sylvester", 256), ("regular", 64), ("sylvester", 64), ("none", 256)]  # entries 2^-k: exact


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind,group", ROTATIONS)
@pytest.mark.parametrize("m,k", [(1, 256), (19, 300), (3, 1300)])
def test_rotate_quantize_kernel_matches_reference_exactly(bits, kind, group, m, k):
    x = _int_valued(m, k, seed=m + k + group)
    x[min(3, m - 1)] = 0.0  # a zero row
    h = GroupHadamardRotation(kind, group).kernel_matrix()
    q_ref, s_ref = custom_ops.rotate_quantize(x, h, group, bits)
    q, s = rotate_quantize(x.to(DEV), None if h is None else h.to(DEV), group, bits)
    assert torch.equal(q.cpu(), q_ref)
    assert torch.equal(s.cpu(), s_ref)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,k", [(40, 512), (300, 3072)])
def test_quantizer_arithmetic_is_exact_on_random_floats(bits, m, k):
    """No rotation, so the kernel quantizes exactly the reference's values: the quotient, its
    rounding (ties included) and the clamp must agree bit for bit, also for scales so small or so
    large that the GPU's reciprocal form of the division would over/underflow."""
    g = torch.Generator().manual_seed(m + bits)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10
    qm = 7 if bits == 4 else 127
    x[1] = torch.randint(-2 * qm, 2 * qm + 1, (k,), generator=g).float() / 2  # halves: ties at scale 1
    x[1, 0] = qm
    x[2] *= 1e-39  # subnormal scale
    x[3] *= 1e30   # scale above 2^90
    x[4] = 0.0
    q_ref, s_ref = custom_ops.rotate_quantize(x, None, 256, bits)
    q, s = rotate_quantize(x.to(DEV), None, 256, bits)
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu(), q_ref)


@pytest.mark.parametrize("group,h_size", [(256, 16), (64, 64)])
def test_rotate_quantize_random_floats_are_close(group, h_size):
    x = torch.randn(20, 512) * 3
    h = hadamard_matrix("regular", h_size)
    q, s = rotate_quantize(x.to(DEV), h.to(DEV), group, 4)
    q_ref, s_ref = custom_ops.rotate_quantize(x, h, group, 4)
    torch.testing.assert_close(s.cpu(), s_ref, rtol=1e-6, atol=0)
    diff = (q.cpu().int() - q_ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_rotate_quantize_non_finite_rows_and_poisoned_output():
    x = _int_valued(5, 256, seed=3)
    x[1, 7] = float("nan")
    x[4, 0] = float("-inf")
    h = hadamard_matrix("regular", 16)
    q, s = rotate_quantize(x.to(DEV), h.to(DEV), 256, 4)
    q_ref, s_ref = custom_ops.rotate_quantize(x, h, 256, 4)
    assert torch.isnan(s[1]) and torch.isnan(s[4]) and (q[1] == 0).all() and (q[4] == 0).all()
    torch.testing.assert_close(s.cpu(), s_ref, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(q.cpu(), q_ref)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("m,n,k", [(1, 16, 256), (33, 40, 512)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("persistent", [False, True])
def test_int_gemm_kernel_matches_reference(packed, m, n, k, with_bias, persistent):
    g = torch.Generator().manual_seed(m * n + k)
    lim = 7 if packed else 127
    qx = torch.randint(-lim, lim + 1, (m, k), generator=g, dtype=torch.int8)
    qw = torch.randint(-lim, lim + 1, (n, k), generator=g, dtype=torch.int8)
    if packed:
        qw = pack_int4(qw, 256)
    sx, sw = torch.rand(m, generator=g) + 0.1, torch.rand(n, generator=g) + 0.1
    bias = torch.randn(n, generator=g) if with_bias else None
    ref = custom_ops.int_gemm_reference(qx, sx, qw, sw, bias, packed, 256, torch.float32)
    out = int_gemm(qx.to(DEV), sx.to(DEV), qw.to(DEV), sw.to(DEV), None if bias is None else bias.to(DEV),
                   packed, 256, torch.float32, persistent=persistent)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("warp_specialize", [True, False])
def test_persistent_int_gemm_covers_more_tiles_than_programs(warp_specialize):
    """The persistent GEMM's programs each walk several tiles (4 programs in the interpreter, one
    per SM on a GPU): 3 x 5 tiles of 16 here, ragged in M and N, with a bias; its warp-specialized
    and flattened tile loops alike."""
    g = torch.Generator().manual_seed(11)
    m, n, k = 45, 70, 512
    qx = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    qw = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    sx, sw, bias = torch.rand(m, generator=g) + 0.1, torch.rand(n, generator=g) + 0.1, torch.randn(n, generator=g)
    ref = custom_ops.int_gemm_reference(qx, sx, qw, sw, bias, False, 256, torch.float32)
    out = int_gemm(qx.to(DEV), sx.to(DEV), qw.to(DEV), sw.to(DEV), bias.to(DEV), False, 256, torch.float32,
                   persistent=True, warp_specialize=warp_specialize)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("packed", [True, False])
def test_int_gemm_of_several_linears_is_their_outputs_side_by_side(packed):
    """Linears reading the same activations run as one GEMM (Q/K/V): output [M, sum N], each block
    equal to that linear alone; a linear without bias gets none."""
    g = torch.Generator().manual_seed(5)
    m, k, ns = 19, 512, (16, 40, 24)
    lim = 7 if packed else 127
    qx = torch.randint(-lim, lim + 1, (m, k), generator=g, dtype=torch.int8)
    sx = torch.rand(m, generator=g) + 0.1
    qws = [torch.randint(-lim, lim + 1, (n, k), generator=g, dtype=torch.int8) for n in ns]
    qws = [pack_int4(w, 256) for w in qws] if packed else qws
    sws = [torch.rand(n, generator=g) + 0.1 for n in ns]
    biases = [torch.randn(ns[0], generator=g), None, torch.randn(ns[2], generator=g)]
    dev = lambda ts: [None if t is None else t.to(DEV) for t in ts]  # noqa: E731
    out = int_gemm(qx.to(DEV), sx.to(DEV), dev(qws), dev(sws), dev(biases), packed, 256, torch.float32).cpu()
    assert out.shape == (m, sum(ns))
    col = 0
    for w, sw, b, n in zip(qws, sws, biases, ns):
        alone = custom_ops.int_gemm_reference(qx, sx, w, sw, b, packed, 256, torch.float32)
        torch.testing.assert_close(out[:, col:col + n], alone, rtol=1e-6, atol=1e-6)
        col += n
    with pytest.raises(ValueError, match="as many weights, scales and biases"):
        int_gemm(qx.to(DEV), sx.to(DEV), dev(qws), dev(sws[:2]), dev(biases), packed, 256, torch.float32)


def test_unpack_kernel_matches_reference():
    from convrot_compiler.kernels.triton.int_gemm import unpack_int4 as unpack_kernel
    from convrot_compiler.numerics.quant import unpack_int4

    q = torch.randint(-8, 8, (37, 768), dtype=torch.int8)
    packed = pack_int4(q, 256)
    assert torch.equal(unpack_kernel(packed.to(DEV), 256).cpu(), q)
    assert torch.equal(unpack_int4(packed, 256), q)


@pytest.mark.parametrize("m,n,k,row_kernel", [(1, 40, 256, True), (1, 40, 600, True), (1, 24, 512, False),
                                              (3, 16, 600, True), (6, 24, 512, True)])
def test_w4a16_kernel_matches_reference(m, n, k, row_kernel):
    g = torch.Generator().manual_seed(m + n + k)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    qw = quantize_weight(w, "w4a16", None, group_size=256)
    ref = custom_ops.weight_only_gemm(x, qw.values, qw.scale, bias, 256, 4)
    out = w4a16_gemm(x.to(DEV), qw.values.to(DEV), qw.scale.to(DEV), bias.to(DEV), 256, row_kernel=row_kernel)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_w4a16_says_when_unaligned_weights_take_the_general_kernel():
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(24, 256, generator=g) * 0.05, torch.randn(1, 256, generator=g)
    qw = quantize_weight(w, "w4a16", None, group_size=256)
    padded = torch.zeros(24, qw.values.shape[1] + 1, dtype=torch.int8, device=DEV)
    padded[:, 1:] = qw.values.to(DEV)
    unaligned = padded[:, 1:]  # same values, rows one byte off a 4-byte boundary
    with pytest.warns(UserWarning, match="not 4-byte aligned"):
        out = w4a16_gemm(x.to(DEV), unaligned, qw.scale.to(DEV), None, 256)
    torch.testing.assert_close(out.cpu(), custom_ops.weight_only_gemm(x, qw.values, qw.scale, None, 256, 4), rtol=1e-5, atol=1e-5)


def test_kernels_reject_bad_input(monkeypatch):
    x = torch.randn(4, 256, device=DEV)
    with pytest.raises(TypeError, match="bf16, fp16 or fp32"):
        rotate_quantize(x.to(torch.int32), None, 256, 4)
    with pytest.raises(ValueError, match="contiguous"):
        rotate_quantize(torch.randn(256, 4, device=DEV).T, None, 256, 4)
    with pytest.raises(ValueError, match="Kronecker"):
        rotate_quantize(x, torch.eye(8, device=DEV), 256, 4)
    with pytest.raises(ValueError, match="Kronecker"):
        rotate_quantize(x, torch.eye(256, device=DEV), 256, 4)
    q = torch.zeros(4, 100, dtype=torch.int8, device=DEV)
    s = torch.ones(4, device=DEV)
    with pytest.raises(ValueError, match="multiple of group_size"):
        int_gemm(q, s, q, s, None, False, 256, torch.float32)
    with pytest.raises(ValueError, match="K mismatch"):
        int_gemm(q, s, q, s, None, True, 256, torch.float32)
    with pytest.raises(TypeError, match="int8"):
        int_gemm(q.float(), s, q, s, None, False, 256, torch.float32)
    q256 = torch.zeros(4, 256, dtype=torch.int8, device=DEV)
    with pytest.raises(TypeError, match="int8 activations"):
        int_gemm(q256.to(torch.float8_e4m3fn), s, q256, s, None, False, 256, torch.float32)
    every_other = torch.ones(8, device=DEV)[::2]  # the kernels would read elements 0-3, not 0, 2, 4, 6
    for sx, sw, bias, name in ((every_other, s, None, "activation scales"), (s, every_other, None, "weight scales"),
                               (s, s, every_other, "bias")):
        with pytest.raises(ValueError, match=f"{name} must be contiguous"):
            int_gemm(q256, sx, q256[:4], sw, bias, False, 256, torch.float32)
        with pytest.raises(ValueError, match=f"{name} must be contiguous"):
            dispatch.int_gemm(q256, sx, [q256[:4]], [sw], [bias], False, 256, torch.float32)
    qw = quantize_weight(torch.randn(4, 256) * 0.05, "w4a16", None, group_size=256)
    with pytest.raises(ValueError, match="bias must be contiguous"):
        w4a16_gemm(torch.randn(1, 256, device=DEV), qw.values.to(DEV), qw.scale.to(DEV), every_other, 256)
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA tensors"):
            rotate_quantize(x, None, 256, 4)



@pytest.mark.parametrize("bits", [4, 8])
def test_rotate_quantize_reads_a_concatenation_from_both_parts(bits):
    """rotate_quantize(x1, x2=x2) == rotate_quantize(cat([x1, x2])) bit for bit, with x2 a column slice
    of a wider tensor (as the MLP part of a fused GEMM's output), K not a multiple of the group."""
    g = torch.Generator().manual_seed(20 + bits)
    h = hadamard_matrix("regular", 16)
    x1 = torch.randn(6, 512, generator=g).bfloat16()
    wide = (torch.randn(6, 1000, generator=g) * 3).bfloat16()
    x2 = wide[:, 300:]
    q, s = rotate_quantize(x1.to(DEV), h.to(DEV), 256, bits, x2=wide.to(DEV)[:, 300:])
    q_ref, s_ref = custom_ops.rotate_quantize_reference(torch.cat([x1, x2], -1), h, 256, bits)
    assert q.shape == (6, 1280)
    assert torch.equal(q.cpu(), q_ref)
    torch.testing.assert_close(s.cpu(), s_ref, rtol=1e-6, atol=0)
    q_op, s_op = custom_ops.rotate_quantize_cat(x1, x2, h, 256, bits)
    assert torch.equal(q_op, q_ref) and torch.equal(s_op, s_ref)


@pytest.mark.parametrize("order", ["natural", "mma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k2", [0, 744])
def test_rotate_quantize_of_e4m3_rows_equals_their_dequantized_rows(k2, dtype, order):
    """x in e4m3 with its descale (fp8 attention's output) is widened as it loads, by dequantize_e4m3's rounding:
    bit for bit the kernel on the dequantized rows and the custom op's reference, alone and concatenated with a
    16-bit x2 (a column slice, K off the group grid)."""
    from convrot_compiler.numerics.fp8_attention import dequantize_e4m3, quantize_e4m3

    g = torch.Generator().manual_seed(31 + k2)
    h = hadamard_matrix("regular", 16)
    x8, descale = quantize_e4m3(torch.randn(5, 512, generator=g) * 7)
    wide = (torch.randn(5, 1000, generator=g) * 3).to(dtype)
    x2 = wide[:, 1000 - k2:] if k2 else None
    x = dequantize_e4m3(x8, descale, dtype)
    dev = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    q_ref, s_ref = rotate_quantize(dev(x), dev(h), 256, 4, x2=dev(x2), order=order)
    q, s = rotate_quantize(dev(x8), dev(h), 256, 4, x2=dev(x2), order=order, x_descale=dev(descale), dtype=dtype)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    q_op, s_op = custom_ops.rotate_quantize_e4m3(x8, descale, x2, h, 256, 4, order, dtype)
    q_cat, s_cat = custom_ops.rotate_quantize_cat(x, x2, h, 256, 4, order) if k2 else custom_ops.rotate_quantize(
        x, h, 256, 4, order)
    assert torch.equal(q_op, q_cat) and torch.equal(s_op, s_cat)
    torch.testing.assert_close(s.cpu(), s_cat, rtol=1e-6, atol=0)


def test_rotate_quantize_of_e4m3_rows_says_what_it_needs():
    x8 = torch.zeros(3, 256, dtype=torch.float8_e4m3fn, device=DEV)
    one = torch.ones(1, device=DEV)
    with pytest.raises(TypeError, match="must be float8_e4m3fn"):
        rotate_quantize(x8.bfloat16(), None, 256, 4, x_descale=one, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one float32 value"):
        rotate_quantize(x8, None, 256, 4, x_descale=torch.ones(2, device=DEV), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="widens to dtype"):
        rotate_quantize(x8, None, 256, 4, x_descale=one)
    with pytest.raises(ValueError, match="widens to dtype"):
        rotate_quantize(x8, None, 256, 4, x2=torch.zeros(3, 256, device=DEV).half(), x_descale=one,
                        dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="e4m3 with x_descale"):
        rotate_quantize(x8, None, 256, 4)


def test_rotate_quantize_rejects_a_concatenation_off_the_group_grid():
    x1, x2 = torch.randn(3, 100).bfloat16(), torch.randn(3, 256).bfloat16()
    with pytest.raises(ValueError, match="multiple of group_size=256"):
        rotate_quantize(x1.to(DEV), None, 256, 4, x2=x2.to(DEV))
    with pytest.raises(ValueError, match="needs x"):
        rotate_quantize(None, None, 256, 4)


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("gelu_from", [0, 24])
def test_int_gemm_applies_gelu_in_its_epilogue(persistent, gelu_from, assert_gelu_epilogue_close):
    """gelu_from: GELU (tanh form) on output columns >= gelu_from, in float32 before the cast, as the
    reference computes it (on a GPU with the hardware tanh); columns before it untouched. Ragged N
    across the GELU boundary; under the interpreter (16-column tiles) one tile lies wholly below
    gelu_from = 24 and one straddles it."""
    g = torch.Generator().manual_seed(31 + gelu_from)
    m, k = 19, 512
    qx = torch.randint(-7, 8, (m, k), generator=g, dtype=torch.int8)
    qws = [pack_int4(torch.randint(-7, 8, (r, k), generator=g, dtype=torch.int8), 256) for r in (24, 16)]
    sws = [torch.rand(r, generator=g) * 0.02 + 1e-3 for r in (24, 16)]
    biases = [torch.randn(24, generator=g), None]
    sx = torch.rand(m, generator=g) + 0.1
    ref = custom_ops.int_gemm_reference(qx, sx, qws, sws, biases, True, 256, torch.float32, gelu_from)
    plain = custom_ops.int_gemm_reference(qx, sx, qws, sws, biases, True, 256, torch.float32)
    gelu = torch.nn.functional.gelu(plain[:, gelu_from:], approximate="tanh")
    assert torch.equal(ref[:, :gelu_from], plain[:, :gelu_from]) and torch.equal(ref[:, gelu_from:], gelu)
    out = int_gemm(qx.to(DEV), sx.to(DEV), [w.to(DEV) for w in qws], [s.to(DEV) for s in sws],
                   [biases[0].to(DEV), None], True, 256, torch.float32, persistent=persistent, gelu_from=gelu_from)
    assert_gelu_epilogue_close(out, ref, plain)
    assert torch.equal(out[:, :gelu_from].cpu(), int_gemm(
        qx.to(DEV), sx.to(DEV), qws[0].to(DEV), sws[0].to(DEV), biases[0].to(DEV), True, 256, torch.float32,
        persistent=persistent)[:, :gelu_from].cpu())
    with pytest.raises(ValueError, match="gelu_from"):
        int_gemm(qx.to(DEV), sx.to(DEV), qws[0].to(DEV), sws[0].to(DEV), None, True, 256, torch.float32,
                 gelu_from=25)


def test_the_sm90_gemm_takes_256_token_tiles_where_its_last_wave_allows():
    """ops/dispatch.py: 256 tokens a tile where that wastes no more of the last wave than 128 would, never with a
    GELU epilogue; at FLUX.1-dev's shapes on 132 SMs, the ones measured faster (image QKV, ff down, to_out at 4096
    tokens) and not the ones measured slower (proj_out at 4608 tokens, the text stream's at 512, QKV+MLP)."""
    def wide(m, n, gelu=False):
        return dispatch.packed_gemm_wide_tokens(m, n, gelu, 132)

    assert wide(4096, 9216) and wide(4096, 3072)
    assert not wide(4608, 3072) and not wide(512, 9216) and not wide(512, 3072)
    assert not wide(4608, 21504, gelu=True) and not wide(4096, 12288, gelu=True)
    assert wide(256 * 132, 128) and not wide(256 * 132 + 128, 128)  # one more 128-token tile starts a wave


def test_dispatch_picks_the_gemm_schedule_by_shape(monkeypatch):
    """ops/dispatch.py: warp-specialized persistent when the output has PERSISTENT_MIN_WAVES tiles of
    PERSISTENT_TILE^2 per program; with a GELU epilogue, unspecialized persistent from PERSISTENT_MIN_M rows,
    or PERSISTENT_WIDE_MIN_M rows when N >= PERSISTENT_WIDE_N; dispatch.int_gemm launches Triton's GEMM with
    that schedule (no sm_90 GEMM here: CPU tensors, or the interpreter)."""
    from convrot_compiler.kernels.triton import int_gemm as mod

    monkeypatch.setattr(dispatch, "PERSISTENT_TILE", 16)
    monkeypatch.setattr(dispatch, "PERSISTENT_MIN_WAVES", 2)  # from 4 output tiles of 16 x 16 on 2 programs
    monkeypatch.setattr(dispatch, "PERSISTENT_MIN_M", 8)
    monkeypatch.setattr(dispatch, "PERSISTENT_WIDE_MIN_M", 4)
    monkeypatch.setattr(dispatch, "PERSISTENT_WIDE_N", 32)

    def rule(m, n=16, gelu=False):
        return dispatch.gemm_schedule(m, n, gelu, 2)

    assert rule(48) == (False, True) and rule(49) == (True, True)
    assert rule(16, n=32) == (False, True) and rule(17, n=32) == (True, True) and rule(1, n=64)[0]
    assert rule(7, gelu=True) == (False, False) and rule(8, gelu=True) == (True, False)
    assert rule(4, n=32, gelu=True)[0] and not rule(3, n=32, gelu=True)[0] and not rule(4, gelu=True)[0]

    calls = []
    monkeypatch.setattr(mod, "_persistent_gemm", lambda *a: calls.append(a[-2]))  # a[-2]: warp_specialize
    monkeypatch.setattr(mod, "programs", lambda device: 2)
    g = torch.Generator().manual_seed(3)
    qw = torch.randint(-127, 128, (16, 256), generator=g, dtype=torch.int8).to(DEV)
    sw = (torch.rand(16, generator=g) + 0.1).to(DEV)

    def run(m, gelu_from=None):
        calls.clear()
        qx = torch.randint(-127, 128, (m, 256), generator=g, dtype=torch.int8).to(DEV)
        dispatch.int_gemm(qx, torch.ones(m, device=DEV), [qw], [sw], [None], False, 256, torch.float32, gelu_from)
        return list(calls)

    assert run(48) == [] and run(49) == [True] and run(8, gelu_from=0) == [False]
    calls.clear()
    int_gemm(torch.zeros(49, 256, dtype=torch.int8, device=DEV), torch.ones(49, device=DEV), qw, sw, None, False, 256,
             torch.float32)
    assert calls == []  # the launcher runs the form it is told: one program per tile unless persistent=True


def test_dispatch_runs_the_sm90_kernels_only_where_they_can():
    """The Gluon kernels have no interpreter: on CPU tensors they say so, and dispatch picks Triton's."""
    from convrot_compiler.kernels.sm90 import rotate_quant as rotate_quant_sm90

    x = torch.randn(4, 1024).bfloat16()
    h = hadamard_matrix("regular", 16)
    assert rotate_quant_sm90.supported(x, None, h, 256) == "not a CUDA tensor"
    assert not dispatch.use_sm90_rotate(x, None, h, 256)
    qx = torch.randint(-7, 8, (4, 256), dtype=torch.int8)
    assert not dispatch.use_sm90_packed_gemm(qx, [pack_int4(torch.zeros(16, 256, dtype=torch.int8), 256)], 256,
                                             torch.bfloat16)


def test_packed_gemm_refuses_what_it_cannot_run():
    """The Gluon GEMM has no interpreter: on CPU tensors supported() says so and packed_gemm raises
    with what to use instead; int_gemm runs the unpack path there (the interpreter under test)."""
    from convrot_compiler.kernels.sm90 import packed_gemm as packed_gemm_sm90

    qx = torch.randint(-7, 8, (4, 256), dtype=torch.int8)
    qw = pack_int4(torch.randint(-7, 8, (16, 256), dtype=torch.int8), 256)
    sx, sw = torch.rand(4) + 0.1, torch.rand(16) + 0.1
    assert packed_gemm_sm90.supported(qx, [qw], 256, torch.float32) == "not a CUDA tensor"
    with pytest.raises(ValueError, match="use kernels.triton.int_gemm.int_gemm"):
        packed_gemm_sm90.packed_gemm(qx, sx, [qw], sw, None, 256, torch.float32)
    if interpreting():
        ref = custom_ops.int_gemm_reference(qx, sx, qw, sw, None, True, 256, torch.float32)
        out = dispatch.int_gemm(qx, sx, [qw], [sw], [None], True, 256, torch.float32)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_sm90_pca_gemm_refuses_what_it_cannot_run():
    """DiRotQ's Gluon GEMM has no interpreter: on CPU tensors supported() says so and pca_gemm raises with what to
    use instead; dispatch runs Triton's kernel there (the interpreter under test)."""
    from convrot_compiler.kernels.sm90 import pca_gemm as pca_gemm_sm90
    from convrot_compiler.numerics.pca import pca_matmul

    g = torch.Generator().manual_seed(5)
    z_hi = torch.randn(4, 64, generator=g).bfloat16()
    q = torch.randint(-7, 8, (4, 128), generator=g, dtype=torch.int8)
    sa = torch.rand(4, 2, generator=g)
    w_hi = torch.randn(16, 64, generator=g).bfloat16()
    qw = pack_int4(torch.randint(-7, 8, (16, 128), generator=g, dtype=torch.int8), 128)  # a pair of groups
    sw = torch.rand(16, 2, generator=g)
    assert pca_gemm_sm90.supported(z_hi, q, w_hi, qw, 64) == "not a CUDA tensor"
    with pytest.raises(ValueError, match="use kernels.triton.pca.pca_gemm"):
        pca_gemm_sm90.pca_gemm(z_hi, q, sa, w_hi, qw, sw, None, 64)
    if interpreting():
        ref = pca_matmul(z_hi, q, sa, w_hi, qw, sw, None, 64).float()
        out = dispatch.pca_gemm(z_hi, q, sa, w_hi, qw, sw, None, 64).float()
        assert ((out - ref).abs() <= 2.0 ** -7 * (ref.abs() + ref.abs().mean())).all()


def test_tiles_w4a16_kernel_refuses_cpu_tensors_with_what_to_use():
    from convrot_compiler.kernels.sm90.weight_only import w4a16_gemm_tiles
    from convrot_compiler.numerics.quant import pack_int4_tiles

    tiles = pack_int4_tiles(torch.zeros(16, 256, dtype=torch.int8))
    with pytest.raises(ValueError, match="not a CUDA tensor.*groups layout"):
        w4a16_gemm_tiles(torch.zeros(1, 256, dtype=torch.bfloat16), tiles, torch.ones(16, 1), None, 256)


@pytest.mark.parametrize("m,n,k,group", [(1, 40, 300, 256), (3, 16, 256, 256), (6, 24, 1000, 512)])
def test_w8a16_kernel_matches_reference(m, n, k, group):
    """Int8 weight-only: the kernel against the reference, K off the group grid (zero-padded weights)."""
    from convrot_compiler.kernels.triton.weight_only import w8a16_gemm

    g = torch.Generator().manual_seed(m * n + k)
    w = torch.randn(n, k, generator=g)
    qw = quantize_weight(w, "w8a16", None, group_size=group)
    assert qw.values.dtype == torch.int8 and qw.values.shape == (n, -(-k // group) * group)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g)
    ref = custom_ops.weight_only_gemm(x, qw.values, qw.scale, bias, group, 8)
    out = w8a16_gemm(x.to(DEV), qw.values.to(DEV), qw.scale.to(DEV), bias.to(DEV), group)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
    assert (ref - (x @ w.T + bias)).norm() / (x @ w.T + bias).norm() < 0.01  # int8 weights: under 1% off float
    with pytest.raises(ValueError, match="needs group_size a multiple of 256"):
        w8a16_gemm(x.to(DEV), qw.values.to(DEV), qw.scale.to(DEV), None, 128)


@pytest.mark.parametrize("hadamard", [None, "regular"])
@pytest.mark.parametrize("m,k,blocks,rank", [(1, 256, 1, 64), (19, 256, 1, 0), (33, 384, 1, 128), (5, 512, 2, 64),
                                         (7, 768, 1, 192)])
def test_pca_rotate_quantize_kernel_matches_reference_exactly(hadamard, m, k, blocks, rank):
    """A signed-permutation basis on integer-valued activations: every product is exact, so the kernel and the
    reference agree bit for bit on z_hi, the int4 values and the scales."""
    from convrot_compiler.kernels.triton.pca import pca_rotate_quantize
    from convrot_compiler.numerics.pca import pca_rotate_quantize as reference

    g = torch.Generator().manual_seed(m + k + rank)
    x = _int_valued(m, k, seed=m + k).bfloat16()
    x[min(2, m - 1)] = 0.0
    b = k // blocks
    basis = torch.zeros(blocks, b, b)
    for j in range(blocks):
        signs = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
        basis[j, torch.randperm(b, generator=g), torch.arange(b)] = signs
    basis = basis.bfloat16()
    h = None if hadamard is None else hadamard_matrix("regular", 64)
    z_ref, q_ref, s_ref = reference(x, basis, h, rank, 64)
    z, q, s = pca_rotate_quantize(x.to(DEV), basis.to(DEV), None if h is None else h.to(DEV), rank, 64)
    assert torch.equal(z.cpu(), z_ref) and torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


def test_pca_rotate_quantize_kernel_takes_rows_that_tma_cannot_read_in_place():
    """Rows of a wider tensor at an odd stride (not 16-byte aligned, which TMA needs) give the same result."""
    from convrot_compiler.kernels.triton.pca import pca_rotate_quantize
    from convrot_compiler.numerics.pca import pca_rotate_quantize as reference

    x = _int_valued(9, 257, seed=3).bfloat16().to(DEV)[:, 1:]
    assert (x.stride(0) * x.element_size()) % 16 and not x.is_contiguous()
    basis = torch.eye(256).flip(1).bfloat16().reshape(1, 256, 256)
    got = pca_rotate_quantize(x, basis.to(DEV), None, 64, 64)
    want = reference(x.cpu(), basis, None, 64, 64)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,rank,lo", [(1, 48, 64, 192), (37, 80, 0, 128), (20, 16, 128, 64)])
def test_pca_gemm_kernel_matches_reference(dtype, m, n, rank, lo):
    """Weights packed per pair of groups (lo 128) and per group (an odd number of groups: 192, 64)."""
    from convrot_compiler.kernels.triton.pca import pca_gemm
    from convrot_compiler.numerics.pca import int4_pack, pca_matmul

    g = torch.Generator().manual_seed(m + n + rank)
    z_hi = torch.randn(m, rank, generator=g).to(dtype)
    q = torch.randint(-7, 8, (m, lo), generator=g, dtype=torch.int8)
    sa = torch.rand(m, lo // 64, generator=g) * 0.1
    w_hi = (torch.randn(n, rank, generator=g) * 0.1).to(dtype)
    qw = pack_int4(torch.randint(-7, 8, (n, lo), generator=g, dtype=torch.int8), int4_pack(lo, 64))
    sw = torch.rand(n, lo // 64, generator=g) * 0.01
    bias = torch.randn(n, generator=g).to(dtype)
    ref = pca_matmul(z_hi, q, sa, w_hi, qw, sw, bias, 64).float()
    out = pca_gemm(*(t.to(DEV) for t in (z_hi, q, sa, w_hi, qw, sw, bias)), 64).float().cpu()
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -7  # bf16: one rounding step of the output
    assert torch.all((out - ref).abs() <= tol * (ref.abs() + ref.abs().mean())), (out - ref).abs().max()


def test_pca_gemm_refuses_operands_its_kernels_would_read_wrong():
    """A strided bias or scale columns, a bias of the wrong length and float64 scales are refused before the
    kernel (which reads them at unit stride, and float32), with what is wrong; the same operands made dense run."""
    from convrot_compiler.kernels.triton.pca import pca_gemm
    from convrot_compiler.numerics.pca import int4_pack

    m, n, rank, lo = 8, 16, 64, 128
    z_hi, w_hi = torch.randn(m, rank, device=DEV), torch.randn(n, rank, device=DEV) * 0.1
    q = torch.randint(-7, 8, (m, lo), dtype=torch.int8, device=DEV)
    qw = pack_int4(torch.randint(-7, 8, (n, lo), dtype=torch.int8), int4_pack(lo, 64)).to(DEV)
    sa, sw = torch.rand(m, lo // 64, device=DEV), torch.rand(n, lo // 64, device=DEV) * 0.01
    bias = torch.randn(2 * n, device=DEV)
    bad = {"bias must be contiguous": dict(bias=bias[::2]), r"bias must have shape \[16\]": dict(bias=bias),
           "sa must have a contiguous last dimension": dict(sa=torch.rand(lo // 64, m, device=DEV).T),
           "scales must be float32": dict(sw=sw.double())}
    for message, change in bad.items():
        operands = dict(z_hi=z_hi, q=q, sa=sa, w_hi=w_hi, qw=qw, sw=sw, bias=bias[:n])
        operands.update(change)
        with pytest.raises(ValueError, match=message):
            pca_gemm(**operands, group_size=64)
    assert pca_gemm(z_hi, q, sa, w_hi, qw, sw, bias[::2].contiguous(), 64).shape == (m, n)


@pytest.mark.parametrize("group_size", [None, 64])
def test_gptq_column_kernel_equals_the_reference_in_float32(group_size):
    """Every operation of the kernel's column loop is rounded as torch rounds the reference's, so GPTQ with the
    kernel gives the reference's values and scales bit for bit (20 rows: a partial row tile)."""
    from convrot_compiler.kernels.triton.gptq import gptq_columns
    from convrot_compiler.numerics.gptq import gptq_quantize

    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 16, generator=g) @ torch.randn(16, 256, generator=g) + 0.1 * torch.randn(512, 256, generator=g)
    w = torch.randn(20, 256, generator=g)
    h = x.T @ x / 512
    q0, s0 = gptq_quantize(w, h, 4, group_size=group_size, dtype=torch.float32)
    q1, s1 = gptq_quantize(w, h, 4, group_size=group_size, dtype=torch.float32, solver=gptq_columns)
    assert torch.equal(q1, q0) and torch.equal(s1, s0)
    assert not torch.equal(q0, gptq_quantize(w, torch.eye(256), 4, group_size=group_size)[0])  # GPTQ moved values


def test_gptq_column_kernel_refuses_what_it_cannot_do():
    from convrot_compiler.kernels.triton.gptq import gptq_columns

    wb, ub = torch.zeros(4, 128), torch.eye(128)
    with pytest.raises(ValueError, match="float32"):
        gptq_columns(wb.double(), ub.double(), 7, torch.ones(4), None)
    with pytest.raises(ValueError, match="power-of-two"):
        gptq_columns(torch.zeros(4, 96), torch.eye(96), 7, torch.ones(4), None)
    with pytest.raises(ValueError, match="not both"):
        gptq_columns(wb, ub, 7, torch.ones(4), 64)
