"""Kernels at FLUX.1-dev shapes on a GPU (skipped without CUDA): kernel == reference, and
output buffers that start out poisoned are fully overwritten."""

import pytest
import torch

from convrot_compiler.kernels.triton.int_gemm import int_gemm
from convrot_compiler.kernels.triton.rotate_quant import rotate_quantize as triton_rotate_quantize
from convrot_compiler.kernels.triton.weight_only import w4a16_gemm
from convrot_compiler.numerics.hadamard import hadamard_matrix
from convrot_compiler.numerics.quant import pack_int4, quantize_weight
from convrot_compiler.ops import custom_ops, dispatch
from convrot_compiler.ops.dispatch import rotate_quantize

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
    """What the compiled model runs (ops/dispatch.py: the sm_90 kernel on Hopper, else Triton's)."""
    m = 4608
    x = _dit_activations(m, k)
    h = hadamard_matrix("regular", 16, device="cuda")
    q_ref, s_ref = custom_ops.rotate_quantize_reference(x, h, 256, bits)
    _poison_allocator()
    q, s = rotate_quantize(x, h, 256, bits)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


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
    ref = custom_ops.int_gemm_reference(qx, sx, qw, sw, bias, packed, 256, torch.float32)
    _poison_allocator()
    out = int_gemm(qx, sx, qw, sw, bias, packed, 256, torch.bfloat16, persistent=persistent,
                   warp_specialize=warp_specialize)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    out32 = int_gemm(qx, sx, qw, sw, bias, packed, 256, torch.float32, persistent=persistent,
                     warp_specialize=warp_specialize)
    # the integer part is exact; the epilogue may contract multiply-add into FMA, hence 1e-6
    torch.testing.assert_close(out32, ref, rtol=1e-6, atol=1e-6)


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
@pytest.mark.parametrize("m", [4608, 4096, 512, 77, 1])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_packed_gemm_equals_the_unpack_path(k, n, m, out_dtype):
    """The Gluon GEMM (weights split in registers) against unpack + int8 GEMM on the same operands:
    bit-equal, partial tiles included (M = 77, 1; N = 320), every output element written; through dispatch at
    M = 4096 and N = 3072 in tiles of 256 tokens for a bf16 output (a float32 one keeps 128: the shared memory
    of a 256-token float32 tile is not there)."""
    from convrot_compiler.kernels.sm90.packed_gemm import packed_gemm

    qx = torch.randint(-7, 8, (m, k), dtype=torch.int8, device="cuda")
    qx[0] = 7  # the largest partial sums: 16 * 7 * 7 * K in the kernel's accumulator
    qw = torch.randint(-7, 8, (n, k), dtype=torch.int8, device="cuda")
    qw[0] = -7
    packed = pack_int4(qw, 256)
    sx = torch.rand(m, device="cuda") * 1e-2 + 1e-3
    sw = torch.rand(n, device="cuda") * 1e-2 + 1e-3
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    ref = int_gemm(qx, sx, packed, sw, bias, True, 256, out_dtype)
    _poison_allocator()
    out = packed_gemm(qx, sx, [packed], sw, bias, 256, out_dtype)
    assert torch.equal(out, ref)
    assert torch.equal(dispatch.int_gemm(qx, sx, [packed], [sw], [bias], True, 256, out_dtype), ref)  # what runs


@needs_sm90
@pytest.mark.parametrize("m", [4608, 512])
def test_packed_gemm_fused_weights_and_gelu_equal_the_unpack_path(m):
    """Four weights in one GEMM (TMA descriptors chosen per tile) with the GELU epilogue on the last
    one, bit-equal to the unpack path; a fused linear whose width is not a tile multiple runs the
    unpack path (packed_gemm.supported says why, and dispatch warns so), with equal results."""
    from convrot_compiler.kernels.sm90 import packed_gemm

    qx, sx, qws, sws, biases = _single_block_gemm_operands(m)
    ref = int_gemm(qx, sx, qws, sws, biases, True, 256, torch.bfloat16, gelu_from=9216)
    _poison_allocator()
    assert packed_gemm.supported(qx, qws, 256, torch.bfloat16) is None
    assert torch.equal(dispatch.int_gemm(qx, sx, qws, sws, biases, True, 256, torch.bfloat16, 9216), ref)
    odd = [qws[0][:3000], qws[1]]
    assert "multiple of 128" in packed_gemm.supported(qx, odd, 256, torch.bfloat16)
    odd_scales = [sws[0][:3000], sws[1]]
    ref_odd = int_gemm(qx, sx, odd, odd_scales, [None, None], True, 256, torch.bfloat16)
    with pytest.warns(UserWarning, match="packed GEMM cannot run these operands"):
        out_odd = dispatch.int_gemm(qx, sx, odd, odd_scales, [None, None], True, 256, torch.bfloat16)
    assert torch.equal(out_odd, ref_odd)


@needs_sm90
@pytest.mark.parametrize("m", [4608, 77])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_packed_gemm_256_token_tiles_equal_the_unpack_path(m, out_dtype):
    """Tiles of 256 tokens on the single blocks' four fused weights with the GELU epilogue: bit-equal to the unpack
    path, a partial tile (M = 77) included. A float32 output does not fit their shared memory: refused."""
    import dataclasses

    from convrot_compiler.kernels.sm90 import packed_gemm

    config = dataclasses.replace(packed_gemm.DEFAULT_CONFIG, BM=256, STAGES=4)
    qx, sx, qws, sws, biases = _single_block_gemm_operands(m)
    if config.smem_bytes(out_dtype.itemsize) > packed_gemm.SMEM_LIMIT:
        assert out_dtype == torch.float32
        with pytest.raises(ValueError, match="shared memory"):
            packed_gemm.packed_gemm(qx, sx, qws, torch.cat(sws), torch.cat(biases), 256, out_dtype, 9216, config)
        return
    ref = int_gemm(qx, sx, qws, sws, biases, True, 256, out_dtype, gelu_from=9216)
    _poison_allocator()
    out = packed_gemm.packed_gemm(qx, sx, qws, torch.cat(sws), torch.cat(biases), 256, out_dtype, 9216, config)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("m", [4608, 512])
def test_fused_qkv_mlp_gemm_at_flux_shapes(m):
    """The single blocks' Q, K, V and MLP-in linears as one GEMM: each block of the output equals
    that linear alone."""
    qx, sx, qws, sws, biases = _single_block_gemm_operands(m)
    _poison_allocator()
    out = dispatch.int_gemm(qx, sx, qws, sws, biases, True, 256, torch.float32)
    col = 0
    for w, sw, b in zip(qws, sws, biases):
        alone = dispatch.int_gemm(qx, sx, [w], [sw], [b], True, 256, torch.float32)
        assert torch.equal(out[:, col:col + w.shape[0]], alone)
        col += w.shape[0]


@pytest.mark.parametrize("m", [4608, 512])
def test_fused_qkv_mlp_gemm_with_gelu_epilogue_at_flux_shapes(m, assert_gelu_epilogue_close):
    """The single blocks' fused GEMM with the GELU of its MLP part in the epilogue (gelu_from = 9216):
    equal to the reference (exact GELU in float32 on the scaled output) within the hardware tanh's
    error; the Q/K/V columns untouched; what the compiled model runs (ops/dispatch.py)."""
    qx, sx, qws, sws, biases = _single_block_gemm_operands(m)
    ref = custom_ops.int_gemm_reference(qx, sx, qws, sws, biases, True, 256, torch.float32, 9216)
    pre_gelu = custom_ops.int_gemm_reference(qx, sx, qws, sws, biases, True, 256, torch.float32)
    _poison_allocator()
    out = dispatch.int_gemm(qx, sx, qws, sws, biases, True, 256, torch.float32, 9216)
    assert_gelu_epilogue_close(out, ref, pre_gelu)
    assert torch.equal(out[:, :9216], dispatch.int_gemm(qx, sx, qws[:3], sws[:3], biases[:3], True, 256, torch.float32))
    bf16 = dispatch.int_gemm(qx, sx, qws, sws, biases, True, 256, torch.bfloat16, 9216)
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


def rotate_quantize_sm90(*args, **kwargs):
    from convrot_compiler.kernels.sm90.rotate_quant import rotate_quantize_sm90 as kernel  # Gluon: on a GPU only

    return kernel(*args, **kwargs)


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
    q_ref, s_ref = custom_ops.rotate_quantize_reference(x.cpu(), h.cpu(), 256, bits)
    _poison_allocator()
    q, s = rotate_quantize_sm90(x, h, bits)
    assert torch.equal(q.cpu(), q_ref)
    torch.testing.assert_close(s.cpu(), s_ref, rtol=0, atol=0, equal_nan=True)


@sm90
@pytest.mark.parametrize("k1", [0, 3072])
def test_sm90_rotate_quantize_matches_the_triton_kernel(k1):
    """FLUX's ff down (K = 12288) and proj_out (cat([attn, mlp]) with mlp a column slice of the fused GEMM's
    output): the Gluon kernel against the Triton kernel (the same products, summed in another order)."""
    m = 4608
    x1 = _dit_activations(m, k1) if k1 else None
    x2 = _dit_activations(m, 21504)[:, 9216:]
    h = hadamard_matrix("regular", 16, device="cuda")
    q_ref, s_ref = triton_rotate_quantize(x1, h, 256, 4, x2=x2)
    _poison_allocator()
    q, s = rotate_quantize_sm90(x1, h, 4, x2=x2)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    diff = (q.int() - q_ref.int()).abs()
    assert q.shape == (m, k1 + 12288) and diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


@sm90
@pytest.mark.parametrize("m,k1,k2", [(4608, 0, 3072), (512, 0, 4096), (37, 0, 1280), (300, 1024, 2048)])
def test_sm90_rotated_row_kept_in_registers_equals_rotating_twice(m, k1, k2):
    """Rows of up to 16 groups keep their rotated values in registers between the passes (KEEP), loaded by
    one TMA box unless they are a concatenation: bit-equal to rotating each step again from shared memory,
    masked last step (K = 1280 in a box of 8 groups) and concatenation included; a longer row cannot keep
    them, a concatenation cannot take one box."""
    x1 = _dit_activations(m, k1) if k1 else None
    x2 = _dit_activations(m, k2)
    x2[min(3, m - 1)] = 0
    h = hadamard_matrix("regular", 16, device="cuda")
    first, second = (x1, x2) if x1 is not None else (x2, None)
    q0, s0 = rotate_quantize_sm90(first, h, 4, x2=second, keep=False)
    for one_box in (None, False):  # default: one TMA box for a row that is not a concatenation
        _poison_allocator()
        q1, s1 = rotate_quantize_sm90(first, h, 4, x2=second, keep=True, one_box=one_box)
        assert torch.equal(q0, q1) and torch.equal(s0, s1)
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
    q_ref, s_ref = custom_ops.rotate_quantize_reference(x.cpu(), h.cpu(), 256, bits, "mma")
    _poison_allocator()
    q, s = rotate_quantize_sm90(x, h, bits, order="mma")
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


def _sm90_rotate(x1, h, group_size, bits, x2=None, order="natural"):
    return rotate_quantize_sm90(x1, h, bits, x2=x2, order=order)


@sm90
@pytest.mark.parametrize("kernel", [_sm90_rotate, triton_rotate_quantize], ids=["sm90", "triton"])
@pytest.mark.parametrize("k1", [0, 3072])
def test_mma_order_is_the_natural_order_permuted_at_flux_shapes(kernel, k1):
    """Each kernel in mma order writes its own natural-order values permuted within each group, bit for bit:
    FLUX's ff down and proj_out inputs (a column slice of the fused GEMM's output)."""
    from convrot_compiler.numerics.quant import to_act_order

    x1 = _dit_activations(4608, k1) if k1 else None
    x2 = _dit_activations(4608, 21504)[:, 9216:]
    h = hadamard_matrix("regular", 16, device="cuda")
    q0, s0 = kernel(x1, h, 256, 4, x2=x2)
    _poison_allocator()
    q1, s1 = kernel(x1, h, 256, 4, x2=x2, order="mma")
    assert torch.equal(q1, to_act_order(q0, "mma", 256)) and torch.equal(s1, s0)


@sm90
@pytest.mark.parametrize("m,k1,k2,order", [(4608, 3072, 0, "mma"), (4096, 3072, 0, "natural"), (37, 3072, 0, "mma"),
                                          (4608, 3072, 12288, "mma"), (300, 1024, 2048, "natural")])
def test_sm90_rotate_quantize_of_e4m3_rows_equals_their_dequantized_rows(m, k1, k2, order):
    """fp8 attention's output read as it is (x_descale): FLUX's to_out (K = 3072, one box, kept in registers)
    and proj_out (3072 of e4m3 before the GELU's 12288, rotated twice) bit for bit the kernel on the rows
    dequantize_e4m3 writes, and dispatch's choice the same."""
    from convrot_compiler.numerics.fp8_attention import dequantize_e4m3, quantize_e4m3

    x8, descale = quantize_e4m3(_dit_activations(m, k1))
    x2 = _dit_activations(m, 21504)[:, 21504 - k2:] if k2 else None
    h = hadamard_matrix("regular", 16, device="cuda")
    q_ref, s_ref = rotate_quantize_sm90(dequantize_e4m3(x8, descale, torch.bfloat16), h, 4, x2=x2, order=order)
    _poison_allocator()
    q, s = rotate_quantize_sm90(x8, h, 4, x2=x2, order=order, x_descale=descale)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    q, s = rotate_quantize(x8, h, 256, 4, x2=x2, order=order, x_descale=descale, dtype=torch.bfloat16)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@sm90
def test_sm90_rotate_quantize_says_where_it_cannot_run():
    """A width off the 256-channel grid: the Gluon kernel's check says why, and dispatch warns and runs the
    Triton kernel."""
    from convrot_compiler.kernels.sm90 import rotate_quant as rotate_quant_sm90

    x = _dit_activations(64, 1000)
    h = hadamard_matrix("regular", 16, device="cuda")
    assert "not a multiple of 256" in rotate_quant_sm90.supported(x, None, h, 256)
    with pytest.warns(UserWarning, match="running the Triton kernel"):
        q, s = rotate_quantize(x, h, 256, 4)
    q_t, s_t = triton_rotate_quantize(x, h, 256, 4)
    assert torch.equal(q, q_t) and torch.equal(s, s_t)


@pytest.mark.parametrize("n", [18432, 9216, 3072])
@pytest.mark.parametrize("m,row_kernel", [(1, True), (1, False), (4, True)])
def test_w4a16_at_flux_shapes(n, m, row_kernel):
    k = 3072
    w = torch.randn(n, k, device="cuda") * 0.02
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    qw = quantize_weight(w, "w4a16", None, group_size=256)
    ref = custom_ops.weight_only_gemm(x.float(), qw.values, qw.scale, bias, 256, 4)
    _poison_allocator()
    out = w4a16_gemm(x, qw.values, qw.scale, bias, 256, row_kernel=row_kernel)
    assert torch.isfinite(out).all()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2


def test_kernel_rejects_cpu_tensor_without_interpreter():
    with pytest.raises(ValueError, match="CUDA tensors"):
        triton_rotate_quantize(torch.randn(4, 256), None, 256, 4)


@pytest.mark.parametrize("group_size", [None, 64])
def test_gptq_column_kernel_equals_the_reference_on_the_gpu(group_size):
    """GPTQ with the column kernel against the torch reference, both float32 on the GPU: bit for bit."""
    from convrot_compiler.kernels.triton.gptq import gptq_columns
    from convrot_compiler.numerics.gptq import gptq_quantize

    x = torch.randn(4096, 64, device="cuda") @ torch.randn(64, 1024, device="cuda") + torch.randn(4096, 1024,
                                                                                                  device="cuda")
    w = torch.randn(1000, 1024, device="cuda") * 0.02
    h = x.T @ x / 4096
    q0, s0 = gptq_quantize(w, h, 4, group_size=group_size, dtype=torch.float32)
    q1, s1 = gptq_quantize(w, h, 4, group_size=group_size, dtype=torch.float32, solver=gptq_columns)
    assert torch.equal(q1, q0) and torch.equal(s1, s0)


@sm90
@pytest.mark.parametrize("b,t1,t2,order", [(1, 4096, 0, "mma"), (1, 512, 4096, "mma"), (2, 48, 80, "natural"),
                                           (3, 37, 0, "natural")])
def test_sm90_rotate_quantize_adaln_matches_normalizing_first(b, t1, t2, order):
    """The adaLN normalization computed by the Gluon kernel as the row lands (FLUX's double blocks: one stream; its
    single blocks: text then image tokens per sample; scale and shift chunks of one modulation output) against the
    same kernel on the rows numerics.adaln writes: the float32 statistics differ in summation order and rsqrt, so
    a value may round to the neighbouring bf16 and move its quantized integer by one, rarely."""
    from convrot_compiler.numerics.adaln import adaln_rows_reference

    k = 3072
    x = _dit_activations(b * t1, k).reshape(b, t1, k)
    x2 = _dit_activations(b * t2, k).reshape(b, t2, k) if t2 else None
    emb = (torch.randn(b, 3 * k, device="cuda") * 0.5).to(torch.bfloat16)
    shift, scale = emb[:, :k], emb[:, k:2 * k]
    h = hadamard_matrix("regular", 16, device="cuda")
    q_ref, s_ref = rotate_quantize_sm90(adaln_rows_reference(x, x2, scale, shift, 1e-6), h, 4, order=order)
    _poison_allocator()
    q, s = dispatch.rotate_quantize_adaln(x, x2, scale, shift, 1e-6, h, 256, 4, order=order)
    assert q.shape == q_ref.shape == (b * (t1 + t2), k)
    torch.testing.assert_close(s, s_ref, rtol=2e-3, atol=0)
    moved = (q.int() - q_ref.int()).abs()
    assert moved.max() <= 1 and moved.bool().float().mean() < 1e-3
    q_op, s_op = custom_ops.rotate_quantize_adaln(x, x2, scale, shift, 1e-6, h, 256, 4, order)
    assert torch.equal(q_op, q) and torch.equal(s_op, s)


@sm90
def test_sm90_rotate_quantize_adaln_says_where_it_cannot_run():
    """Rows wider than one box: the kernel's check says why, dispatch warns and normalizes with torch first."""
    from convrot_compiler.kernels.sm90 import rotate_quant as rotate_quant_sm90
    from convrot_compiler.numerics.adaln import adaln_rows_reference

    x = _dit_activations(64, 5120).reshape(1, 64, 5120)
    scale = shift = torch.zeros(1, 5120, dtype=torch.bfloat16, device="cuda")
    h = hadamard_matrix("regular", 16, device="cuda")
    assert "at most 4096" in rotate_quant_sm90.adaln_supported(x, None, scale, shift, h, 256)
    assert "at most 4096" in dispatch.adaln_fusion_unsupported(x.device, x.dtype, 5120)
    assert dispatch.adaln_fusion_unsupported(x.device, x.dtype, 3072) is None
    with pytest.warns(UserWarning, match="normalizing with torch"):
        q, s = dispatch.rotate_quantize_adaln(x, None, scale, shift, 1e-6, h, 256, 4)
    q_ref, s_ref = rotate_quantize(adaln_rows_reference(x, None, scale, shift, 1e-6), h, 256, 4)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
