"""Kernels at FLUX.1-dev shapes on a GPU (skipped without CUDA): kernel == reference, and
output buffers that start out poisoned are fully overwritten."""

import pytest
import torch

from convrot_compiler import ops
from convrot_compiler.hadamard import hadamard_matrix
from convrot_compiler.kernels.int_gemm import forced_schedule, int_gemm
from convrot_compiler.kernels.rotate_quant import forced_rotate_kernel, rotate_quantize
from convrot_compiler.kernels.weight_only import w4a16_gemm
from convrot_compiler.quant import pack_int4, quantize_weight

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _poison_allocator(nbytes=1 << 30):
    """Fill memory the caching allocator will hand out next, so unwritten outputs show up."""
    buf = torch.full((nbytes,), 0x7F, dtype=torch.uint8, device="cuda")
    del buf


def _dit_activations(m, k):
    return (torch.randn(m, k, device="cuda") * 2 + torch.randn(m, 1, device="cuda") * 4).to(torch.bfloat16)


@pytest.mark.parametrize("k", [3072, 12288, 15360])
@pytest.mark.parametrize("bits", [4, 8])
def test_rotate_quantize_at_flux_shapes(k, bits):
    m = 4608
    x = _dit_activations(m, k)
    h = hadamard_matrix("regular", 16, device="cuda")
    q_ref, s_ref = ops.rotate_quantize_reference(x, h, 256, bits)
    _poison_allocator()
    q, s = rotate_quantize(x, h, 256, bits)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


@pytest.mark.parametrize("k1", [0, 3072])
@pytest.mark.parametrize("bits", [4, 8])
def test_rotate_quantize_with_gelu_at_flux_shapes(k1, bits):
    """ff down (gelu(up), K = 12288) and the single blocks' proj_out (cat([attn, gelu(mlp)]), K = 15360):
    the kernel's GELU against torch's, then rotate+quantize. The kernel's GELU takes the hardware tanh
    (_common.gelu_tanh: up to 2^-12 |x| off, plus a bf16 step of the rounded result), which moves each
    rotated value by at most the group's sum of those errors / 16 (entries of the rotation +-1/16) and the
    scale by that over qmax. Rows whose GELU outputs are all small (inputs below about -4: 1 + tanh
    cancels, and the error exceeds the outputs) reach that bound and their values are noise either way;
    on the other rows (the bound under a tenth of the scale) the values stay within one step."""
    m = 4608
    x1 = _dit_activations(m, k1) if k1 else None
    x2 = _dit_activations(m, 12288)
    h = hadamard_matrix("regular", 16, device="cuda")
    cat = ops.cat_reference(x1, x2, True)
    q_ref, s_ref = ops.rotate_quantize_reference(cat, h, 256, bits)  # torch, not the op (which runs the kernel)
    _poison_allocator()
    q, s = rotate_quantize(x1, h, 256, bits, x2=x2, gelu_x2=True)
    pre = x2.float().abs() if x1 is None else torch.cat([torch.zeros_like(x1.float()), x2.float().abs()], -1)
    err = 2.0 ** -12 * pre + 2.0 ** -7 * cat.float().abs()
    bound = (err.reshape(m, -1, 256).sum(-1) / 16).amax(-1) / (7 if bits == 4 else 127)
    assert ((s - s_ref).abs() <= bound + 1e-5 * s_ref).all()
    rows = bound < 0.1 * s_ref
    assert rows.float().mean() > 0.9
    diff = (q.int() - q_ref.int()).abs()[rows]
    assert q.shape == (m, k1 + 12288) and diff.max() <= 1 and (diff > 0).float().mean() < 1e-2


@pytest.mark.parametrize("batch,m", [(1, 4608), (2, 4096), (1, 512)])
@pytest.mark.parametrize("bits", [4, 8])
def test_rotate_quantize_with_adaln_norm_at_flux_shapes(batch, m, bits):
    """FLUX's adaLN input layer_norm(x) * (1 + scale) + shift computed by the kernel as it loads (K = 3072,
    scale and shift chunks of the modulation output) against the op reference: within one step, on a few
    values (the mean and variance are summed in another order, which can flip a bf16 rounding)."""
    x = (_dit_activations(m, 3072) * 8).contiguous()
    emb = (torch.randn(batch, 6 * 3072, device="cuda") * 0.5).to(torch.bfloat16)
    mod_scale, mod_shift = emb[:, 3072:6144], emb[:, :3072]
    h = hadamard_matrix("regular", 16, device="cuda")
    q_ref, s_ref = ops.rotate_quantize_reference(ops.norm_reference(x, mod_scale, mod_shift, 1e-6), h, 256, bits)
    _poison_allocator()
    q, s = rotate_quantize(x, h, 256, bits, norm=(mod_scale, mod_shift, 1e-6))
    torch.testing.assert_close(s, s_ref, rtol=1e-3, atol=0)  # a flipped rounding may move a row's absmax
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-2


@pytest.mark.parametrize("k,n", [(3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072)])
@pytest.mark.parametrize("m", [4608, 77])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("persistent,warp_specialize", [(False, True), (True, True), (True, False)])
def test_int_gemm_at_flux_shapes(k, n, m, packed, persistent, warp_specialize):
    lim = 7 if packed else 127
    qx = torch.randint(-lim, lim + 1, (m, k), dtype=torch.int8, device="cuda")
    qw = torch.randint(-lim, lim + 1, (n, k), dtype=torch.int8, device="cuda")
    if packed:
        qw = pack_int4(qw, 256)
    sx = torch.rand(m, device="cuda") * 1e-2 + 1e-3
    sw = torch.rand(n, device="cuda") * 1e-2 + 1e-3
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    ref = ops.int_gemm_reference(qx, sx, qw, sw, bias, packed, 256, torch.float32)
    _poison_allocator()
    out = int_gemm(qx, sx, qw, sw, bias, packed, 256, torch.bfloat16, persistent=persistent,
                   warp_specialize=warp_specialize)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    out32 = int_gemm(qx, sx, qw, sw, bias, packed, 256, torch.float32, persistent=persistent,
                     warp_specialize=warp_specialize)
    # the integer part is exact; the epilogue may contract multiply-add into FMA, hence 1e-6
    torch.testing.assert_close(out32, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k,n", [(3072, 3072), (3072, 12288), (15360, 3072)])
@pytest.mark.parametrize("m", [4608, 77])
def test_fp8_tensor_core_w4a4_is_exact(k, n, m):
    """int4 x int4 products on fp8 tensor cores, partial sums promoted to fp32 once per K tile,
    give the int8 GEMM's result: the same integers, the same epilogue."""
    qx = torch.randint(-7, 8, (m, k), dtype=torch.int8, device="cuda")
    qx[0] = 7  # the largest partial sums: 7 * 7 * K
    qw = torch.randint(-7, 8, (n, k), dtype=torch.int8, device="cuda")
    qw[0] = 7
    packed = pack_int4(qw, 256)
    sx = torch.rand(m, device="cuda") * 1e-2 + 1e-3
    sw = torch.rand(n, device="cuda") * 1e-2 + 1e-3
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    via_int8 = int_gemm(qx, sx, packed, sw, bias, True, 256, torch.float32)
    _poison_allocator()
    via_fp8 = int_gemm(qx.to(torch.float8_e4m3fn), sx, packed, sw, bias, True, 256, torch.float32)
    assert torch.equal(via_fp8, via_int8)
    ref = ops.int_gemm_reference(qx, sx, packed, sw, bias, True, 256, torch.float32)
    torch.testing.assert_close(via_fp8, ref, rtol=1e-6, atol=1e-6)


def _single_block_gemm_operands(m):
    """int4 activations, scales, and the packed weights, scales and biases of a FLUX.1-dev single
    block's Q, K, V and MLP-in linears (3072 -> 3072 x 3 + 12288)."""
    k, ns = 3072, (3072, 3072, 3072, 12288)
    qx = torch.randint(-7, 8, (m, k), dtype=torch.int8, device="cuda")
    sx = torch.rand(m, device="cuda") * 1e-2 + 1e-3
    qws = [pack_int4(torch.randint(-7, 8, (n, k), dtype=torch.int8, device="cuda"), 256) for n in ns]
    sws = [torch.rand(n, device="cuda") * 1e-2 + 1e-3 for n in ns]
    biases = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for n in ns]
    return qx, sx, qws, sws, biases


needs_sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                reason="the Gluon packed GEMM is sm_90 only")


@needs_sm90
@pytest.mark.parametrize("k,n", [(3072, 3072), (12288, 3072), (15360, 3072), (512, 320)])
@pytest.mark.parametrize("m", [4608, 512, 77, 1])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_packed_gemm_equals_the_unpack_path(k, n, m, out_dtype):
    """The Gluon GEMM (weights split in registers) against unpack + int8 GEMM on the same operands:
    bit-equal, partial tiles included (M = 77, 1; N = 320), every output element written."""
    from convrot_compiler.kernels.packed_gemm_sm90 import packed_gemm

    qx = torch.randint(-7, 8, (m, k), dtype=torch.int8, device="cuda")
    qx[0] = 7  # the largest partial sums: 16 * 7 * 7 * K in the kernel's accumulator
    qw = torch.randint(-7, 8, (n, k), dtype=torch.int8, device="cuda")
    qw[0] = -7
    packed = pack_int4(qw, 256)
    sx = torch.rand(m, device="cuda") * 1e-2 + 1e-3
    sw = torch.rand(n, device="cuda") * 1e-2 + 1e-3
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    with forced_schedule("unpack"):
        ref = int_gemm(qx, sx, packed, sw, bias, True, 256, out_dtype)
    _poison_allocator()
    out = packed_gemm(qx, sx, [packed], sw, bias, 256, out_dtype)
    assert torch.equal(out, ref)
    assert torch.equal(int_gemm(qx, sx, packed, sw, bias, True, 256, out_dtype), ref)  # int_gemm's default here


@needs_sm90
@pytest.mark.parametrize("m", [4608, 512])
def test_packed_gemm_fused_weights_and_gelu_equal_the_unpack_path(m):
    """Four weights in one GEMM (TMA descriptors chosen per tile) with the GELU epilogue on the last
    one, bit-equal to the unpack path; a fused linear whose width is not a tile multiple runs the
    unpack path (packed_gemm_sm90.supported says why, and int_gemm warns so), with equal results."""
    from convrot_compiler.kernels import packed_gemm_sm90

    qx, sx, qws, sws, biases = _single_block_gemm_operands(m)
    with forced_schedule("unpack"):
        ref = int_gemm(qx, sx, qws, sws, biases, True, 256, torch.bfloat16, gelu_from=9216)
    _poison_allocator()
    assert packed_gemm_sm90.supported(qx, qws, 256, torch.bfloat16) is None
    assert torch.equal(int_gemm(qx, sx, qws, sws, biases, True, 256, torch.bfloat16, gelu_from=9216), ref)
    odd = [qws[0][:3000], qws[1]]
    assert "multiple of 128" in packed_gemm_sm90.supported(qx, odd, 256, torch.bfloat16)
    odd_scales = [sws[0][:3000], sws[1]]
    with forced_schedule("unpack"):
        ref_odd = int_gemm(qx, sx, odd, odd_scales, [None, None], True, 256, torch.bfloat16)
    with pytest.warns(UserWarning, match="packed GEMM cannot run these operands"):
        out_odd = int_gemm(qx, sx, odd, odd_scales, [None, None], True, 256, torch.bfloat16)
    assert torch.equal(out_odd, ref_odd)


@pytest.mark.parametrize("m", [4608, 512])
def test_fused_qkv_mlp_gemm_at_flux_shapes(m):
    """The single blocks' Q, K, V and MLP-in linears as one GEMM: each block of the output equals
    that linear alone."""
    qx, sx, qws, sws, biases = _single_block_gemm_operands(m)
    _poison_allocator()
    out = int_gemm(qx, sx, qws, sws, biases, True, 256, torch.float32)
    col = 0
    for w, sw, b in zip(qws, sws, biases):
        alone = int_gemm(qx, sx, w, sw, b, True, 256, torch.float32)
        assert torch.equal(out[:, col:col + w.shape[0]], alone)
        col += w.shape[0]


@pytest.mark.parametrize("m", [4608, 512])
def test_fused_qkv_mlp_gemm_with_gelu_epilogue_at_flux_shapes(m, assert_gelu_epilogue_close):
    """The single blocks' fused GEMM with the GELU of its MLP part in the epilogue (gelu_from = 9216):
    equal to the reference (exact GELU in float32 on the scaled output) within the hardware tanh's
    error; the Q/K/V columns untouched. m = 4608 runs the persistent GEMM, 512 the
    one-program-per-tile one."""
    qx, sx, qws, sws, biases = _single_block_gemm_operands(m)
    ref = ops.int_gemm_reference(qx, sx, qws, sws, biases, True, 256, torch.float32, 9216)
    pre_gelu = ops.int_gemm_reference(qx, sx, qws, sws, biases, True, 256, torch.float32)
    _poison_allocator()
    out = int_gemm(qx, sx, qws, sws, biases, True, 256, torch.float32, gelu_from=9216)
    assert_gelu_epilogue_close(out, ref, pre_gelu)
    exact = int_gemm(qx, sx, qws, sws, biases, True, 256, torch.float32, gelu_from=9216, exact_gelu=True)
    torch.testing.assert_close(exact, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, :9216], int_gemm(qx, sx, qws[:3], sws[:3], biases[:3], True, 256, torch.float32))
    bf16 = int_gemm(qx, sx, qws, sws, biases, True, 256, torch.bfloat16, gelu_from=9216)
    torch.testing.assert_close(bf16.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("bits", [4, 8])
def test_rotate_quantize_reads_a_concatenation_at_flux_shape(bits):
    """The single blocks' proj_out input cat([attn, mlp]) with mlp a column slice of the fused GEMM's
    [M, 21504] output: read in place, bit-equal to rotate+quantize of the concatenation."""
    m = 4608
    x1 = _dit_activations(m, 3072)
    wide = _dit_activations(m, 21504)
    h = hadamard_matrix("regular", 16, device="cuda")
    q_ref, s_ref = rotate_quantize(torch.cat([x1, wide[:, 9216:]], -1), h, 256, bits)
    _poison_allocator()
    q, s = rotate_quantize(x1, h, 256, bits, x2=wide[:, 9216:])
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                          reason="the Gluon kernels need sm_90")


@sm90
@pytest.mark.parametrize("m,k", [(1, 3072), (37, 1280), (300, 15360), (4608, 3072)])
@pytest.mark.parametrize("bits", [4, 8])
def test_sm90_rotate_quantize_is_exact_on_integer_rows(m, k, bits):
    """Integer-valued rows rotate exactly in float32 whatever the order, so the Gluon kernel (row kept in
    shared memory) must equal the reference bit for bit: K = 1280 leaves the last step's groups past the
    row (masked), with a zero row and rows holding NaN and inf."""
    g = torch.Generator(device="cuda").manual_seed(m + k + bits)
    x = torch.randint(-6, 7, (m, k), device="cuda", generator=g).to(torch.bfloat16)
    x[min(3, m - 1)] = 0
    if m > 4:
        x[1, 7], x[2, k - 1] = float("nan"), float("inf")
    h = hadamard_matrix("regular", 16, device="cuda")
    # on the CPU: torch's CUDA float32 matmul was not exact on such rows (an H100, torch 2.11: 2706 of 4608
    # scales off at K = 3072), the CPU's and both kernels were
    q_ref, s_ref = ops.rotate_quantize_reference(x.cpu(), h.cpu(), 256, bits)
    _poison_allocator()
    with forced_rotate_kernel("sm90"):
        q, s = rotate_quantize(x, h, 256, bits)
    assert torch.equal(q.cpu(), q_ref)
    torch.testing.assert_close(s.cpu(), s_ref, rtol=0, atol=0, equal_nan=True)


@sm90
@pytest.mark.parametrize("k1,gelu", [(0, False), (3072, False), (0, True), (3072, True)])
def test_sm90_rotate_quantize_matches_the_triton_kernel(k1, gelu):
    """FLUX's ff down (gelu(x2), K = 12288) and proj_out (cat([attn, gelu(mlp)]) with mlp a column slice of the
    fused GEMM's output), and both without the GELU: the Gluon kernel against the Triton kernel (the same
    products and GELU, summed in another order)."""
    m = 4608
    x1 = _dit_activations(m, k1) if k1 else None
    x2 = _dit_activations(m, 21504)[:, 9216:]
    h = hadamard_matrix("regular", 16, device="cuda")
    with forced_rotate_kernel("triton"):
        q_ref, s_ref = rotate_quantize(x1, h, 256, 4, x2=x2, gelu_x2=gelu)
    _poison_allocator()
    with forced_rotate_kernel("sm90"):
        q, s = rotate_quantize(x1, h, 256, 4, x2=x2, gelu_x2=gelu)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    diff = (q.int() - q_ref.int()).abs()
    assert q.shape == (m, k1 + 12288) and diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


@sm90
@pytest.mark.parametrize("m,k1,k2,gelu", [(4608, 0, 3072, False), (512, 0, 4096, False), (37, 0, 1280, False),
                                          (300, 1024, 2048, True)])
@pytest.mark.parametrize("out_dtype", [torch.int8, torch.float8_e4m3fn])
def test_sm90_rotated_row_kept_in_registers_equals_rotating_twice(m, k1, k2, gelu, out_dtype):
    """Rows of up to 16 groups keep their rotated values in registers between the passes (KEEP), loaded by
    one TMA box unless they are a concatenation: bit-equal to rotating each step again from shared memory,
    masked last step (K = 1280 in a box of 8 groups) and concatenation (with GELU) included; a longer row
    cannot keep them, a concatenation cannot take one box."""
    from convrot_compiler.kernels.rotate_quant_sm90 import rotate_quantize_sm90

    x1 = _dit_activations(m, k1) if k1 else None
    x2 = _dit_activations(m, k2)
    x2[min(3, m - 1)] = 0
    h = hadamard_matrix("regular", 16, device="cuda")
    first, second = (x1, x2) if x1 is not None else (x2, None)
    q0, s0 = rotate_quantize_sm90(first, h, 4, out_dtype, x2=second, gelu_x2=gelu, keep=False)
    for one_box in (None, False):  # default: one TMA box for a row that is not a concatenation
        _poison_allocator()
        q1, s1 = rotate_quantize_sm90(first, h, 4, out_dtype, x2=second, gelu_x2=gelu, keep=True, one_box=one_box)
        assert torch.equal(q0.view(torch.int8), q1.view(torch.int8)) and torch.equal(s0, s1)
    with pytest.raises(ValueError, match="at most 4 steps"):
        rotate_quantize_sm90(_dit_activations(4, 5120), h, 4, keep=True)
    if x1 is not None:
        with pytest.raises(ValueError, match="not a concatenation"):
            rotate_quantize_sm90(first, h, 4, x2=second, keep=True, one_box=True)


@sm90
@pytest.mark.parametrize("m,k", [(1, 3072), (37, 1280), (300, 15360), (4608, 3072)])
@pytest.mark.parametrize("bits", [4, 8])
def test_sm90_mma_order_is_exact_on_integer_rows(m, k, bits):
    """The channel order the compiler picks on sm_90 (quant.mma_channel_order, one 8-byte store per lane and
    step): bit for bit the reference in that order, kept rows (K = 3072), a masked last step (K = 1280) and
    rows rotated twice (K = 15360) alike, output fully overwritten."""
    g = torch.Generator(device="cuda").manual_seed(m + k + bits + 1)
    x = torch.randint(-6, 7, (m, k), device="cuda", generator=g).to(torch.bfloat16)
    x[min(3, m - 1)] = 0
    h = hadamard_matrix("regular", 16, device="cuda")
    q_ref, s_ref = ops.rotate_quantize_reference(x.cpu(), h.cpu(), 256, bits, "mma")
    _poison_allocator()
    with forced_rotate_kernel("sm90"):
        q, s = rotate_quantize(x, h, 256, bits, order="mma")
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


@sm90
@pytest.mark.parametrize("kernel", ["sm90", "triton"])
@pytest.mark.parametrize("k1,gelu,out_dtype", [(0, False, torch.int8), (3072, True, torch.int8),
                                               (0, False, torch.float8_e4m3fn), (3072, False, torch.float8_e4m3fn)])
def test_mma_order_is_the_natural_order_permuted_at_flux_shapes(kernel, k1, gelu, out_dtype):
    """Each kernel in mma order writes its own natural-order values permuted within each group, bit for bit:
    FLUX's ff down and proj_out inputs (a column slice of the fused GEMM's output, GELU), fp8 containers."""
    from convrot_compiler.quant import to_act_order

    x1 = _dit_activations(4608, k1) if k1 else None
    x2 = _dit_activations(4608, 21504)[:, 9216:]
    h = hadamard_matrix("regular", 16, device="cuda")
    with forced_rotate_kernel(kernel):
        q0, s0 = rotate_quantize(x1, h, 256, 4, out_dtype, x2=x2, gelu_x2=gelu)
        _poison_allocator()
        q1, s1 = rotate_quantize(x1, h, 256, 4, out_dtype, x2=x2, gelu_x2=gelu, order="mma")
    assert torch.equal(q1.view(torch.int8), to_act_order(q0.view(torch.int8), "mma", 256)) and torch.equal(s1, s0)


@sm90
def test_sm90_rotate_quantize_says_where_it_cannot_run():
    """A width off the 256-channel grid: forced to the Gluon kernel it raises; by default rotate_quantize warns
    and runs the Triton kernel."""
    x = _dit_activations(64, 1000)
    h = hadamard_matrix("regular", 16, device="cuda")
    with forced_rotate_kernel("sm90"), pytest.raises(ValueError, match="not a multiple of 256"):
        rotate_quantize(x, h, 256, 4)
    with pytest.warns(UserWarning, match="running the Triton kernel"):
        q, s = rotate_quantize(x, h, 256, 4)
    with forced_rotate_kernel("triton"):
        q_t, s_t = rotate_quantize(x, h, 256, 4)
    assert torch.equal(q, q_t) and torch.equal(s, s_t)


def test_rotate_quantize_fp8_container_equals_int8():
    x = _dit_activations(4608, 3072)
    h = hadamard_matrix("regular", 16, device="cuda")
    q8, s8 = rotate_quantize(x, h, 256, 4)
    _poison_allocator()
    qf, sf = rotate_quantize(x, h, 256, 4, torch.float8_e4m3fn)
    assert torch.equal(qf.float(), q8.float()) and torch.equal(sf, s8)


@pytest.mark.parametrize("n", [18432, 9216, 3072])
@pytest.mark.parametrize("m,row_kernel", [(1, True), (1, False), (4, True)])
def test_w4a16_at_flux_shapes(n, m, row_kernel):
    k = 3072
    w = torch.randn(n, k, device="cuda") * 0.02
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    qw = quantize_weight(w, "w4a16", None, group_size=256)
    ref = ops.w4a16_gemm_reference(x.float(), qw.values, qw.scale, bias, 256)
    _poison_allocator()
    out = w4a16_gemm(x, qw.values, qw.scale, bias, 256, row_kernel=row_kernel)
    assert torch.isfinite(out).all()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2


def test_kernel_rejects_cpu_tensor_without_interpreter():
    with pytest.raises(ValueError, match="CUDA tensors"):
        rotate_quantize(torch.randn(4, 256), None, 256, 4)
