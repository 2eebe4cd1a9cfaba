"""The sm_90 Gluon kernels compile for sm_90 under the installed Triton, on any machine: Triton's compiler and the
ptxas it ships need no GPU. A stand-in driver names an sm_90 target; each kernel's wrapper runs on CPU tensors up
to the launch, which the stand-in refuses. Gluon's API moves between Triton releases (3.6 -> 3.9 renamed its TMA
copies, a descriptor's reinterpret and the thread barrier); this is where such a move shows, without a Hopper GPU.
GPU tests check what the kernels compute.

Where the rest of the suite runs Triton through its interpreter (conftest, without a GPU), these tests run in a
process of their own without it: the interpreter's functions are what a Gluon kernel would reference then
(``gl.sum``'s combine function), and a kernel it has run leaves ``triton.language`` patched for the process."""

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon")


class _ReachedLaunch(Exception):
    """The wrapper compiled its kernel and asked the driver to load and launch it."""


class _Sm90Driver:
    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def __getattr__(self, name):
        raise _ReachedLaunch(name)


def _ptxas_missing() -> str | None:
    """Why Triton cannot compile for an NVIDIA target here (its NVIDIA backend ships ptxas beside it), or None."""
    import os

    ptxas = os.environ.get("TRITON_PTXAS_PATH") or os.path.join(os.path.dirname(triton.__file__), "backends",
                                                                  "nvidia", "bin", "ptxas")
    return None if os.access(ptxas, os.X_OK) else f"no ptxas at {ptxas}"


pytestmark = pytest.mark.skipif(_ptxas_missing() is not None, reason=str(_ptxas_missing()))


@pytest.fixture
def sm90(monkeypatch):
    """Triton's active driver replaced by the sm_90 stand-in, the wrappers' SM count fixed, the kernels' per-device
    caches emptied before (on a GPU machine they may hold loaded kernels, which would launch on CPU pointers) and
    after (they then hold kernels no GPU loaded); the driver restored."""
    from triton.runtime import driver

    from convrot_compiler.kernels.sm90 import packed_gemm, pca_gemm, rotate_quant, weight_only
    from convrot_compiler.kernels.triton.common import interpreting

    if interpreting():
        pytest.skip("Triton's interpreter is on in this process: test_gluon_kernels_compile_without_the_interpreter "
                    "runs this test in a process of its own")

    kernels = [packed_gemm._packed_gemm_kernel, pca_gemm._pca_gemm_kernel, rotate_quant._rotate_quant_sm90_kernel,
               weight_only._tiles_kernel]
    for module in (packed_gemm, pca_gemm):
        monkeypatch.setattr(module, "sm_count", lambda device: 132)
    monkeypatch.setattr(weight_only, "supported", lambda x: None)
    for kernel in kernels:
        kernel.device_caches.clear()
    saved = driver._active
    driver.set_active(_Sm90Driver())
    try:
        yield
    finally:
        driver._active = saved
        for kernel in kernels:
            kernel.device_caches.clear()


def test_gluon_kernels_compile_without_the_interpreter():
    """This module's compile tests in a fresh process with Triton's interpreter off, where it is on in this one."""
    from convrot_compiler.kernels.triton.common import interpreting

    if not interpreting():
        pytest.skip("the interpreter is off: the compile tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summary = run.stdout.splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary.replace("1 skipped", ""), summary  # only this one


def _compiles(kernel, call) -> None:
    with pytest.raises(_ReachedLaunch):
        call()
    assert len(kernel.device_caches[0][0]) == 1  # one compiled specialization, cached


def test_packed_gemm_compiles_for_sm90(sm90):
    from convrot_compiler.kernels.sm90 import packed_gemm

    m, k = 256, 3072
    qws = [torch.zeros(384, k // 2, dtype=torch.int8), torch.zeros(256, k // 2, dtype=torch.int8)]
    _compiles(packed_gemm._packed_gemm_kernel, lambda: packed_gemm.packed_gemm_unchecked(
        torch.zeros(m, k, dtype=torch.int8), torch.ones(m), qws, torch.ones(640), torch.zeros(640, dtype=torch.bfloat16),
        256, torch.bfloat16, gelu_from=384))


@pytest.mark.parametrize("e4m3", [False, True])
@pytest.mark.parametrize("concatenation", [False, True])
def test_rotate_quantize_compiles_for_sm90(sm90, concatenation, e4m3):
    """Both of FLUX's forms (3072 channels; 3072 + 12288 concatenated), x in bf16 or as fp8 attention's e4m3 output."""
    from convrot_compiler.kernels.sm90 import rotate_quant

    x = torch.zeros(64, 3072, dtype=torch.float8_e4m3fn if e4m3 else torch.bfloat16)
    x2 = torch.zeros(64, 12288, dtype=torch.bfloat16) if concatenation else None
    _compiles(rotate_quant._rotate_quant_sm90_kernel, lambda: rotate_quant.rotate_quantize_sm90(
        x, torch.ones(16, 16, dtype=torch.bfloat16), 4, x2=x2, order="mma",
        x_descale=torch.ones(1) if e4m3 else None))


@pytest.mark.parametrize("two_sources", [False, True])
def test_rotate_quantize_adaln_compiles_for_sm90(sm90, two_sources):
    """FLUX's adaLN inputs: a double block's image tokens, and a single block's text and image tokens together."""
    from convrot_compiler.kernels.sm90 import rotate_quant

    x = torch.zeros(1, 32, 3072, dtype=torch.bfloat16)
    x2 = torch.zeros(1, 96, 3072, dtype=torch.bfloat16) if two_sources else None
    emb = torch.zeros(1, 3 * 3072, dtype=torch.bfloat16)
    scale, shift = emb[:, 3072:6144], emb[:, :3072]
    _compiles(rotate_quant._rotate_quant_sm90_kernel, lambda: rotate_quant.rotate_quantize_adaln_sm90(
        x, x2, scale, shift, 1e-6, torch.ones(16, 16, dtype=torch.bfloat16), 4, order="mma"))


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_only_gemv_compiles_for_sm90(sm90, bits):
    from convrot_compiler.kernels.sm90 import weight_only

    k, n = 3072, 3072
    tiles = torch.zeros(n // 16, k // 64, 32, 4, dtype=weight_only._TILE_DTYPES[bits])
    call = weight_only.w4a16_gemm_tiles if bits == 4 else weight_only.w8a16_gemm_tiles
    _compiles(weight_only._tiles_kernel, lambda: call(torch.zeros(1, k, dtype=torch.bfloat16), tiles,
                                                      torch.ones(n, k // 256), None, 256))


def test_dirotq_gemm_compiles_for_sm90(sm90):
    from convrot_compiler.kernels.sm90 import pca_gemm

    m, r, lo, n = 256, 384, 2688, 512
    _compiles(pca_gemm._pca_gemm_kernel, lambda: pca_gemm.pca_gemm_unchecked(
        torch.zeros(m, r, dtype=torch.bfloat16), torch.zeros(m, lo, dtype=torch.int8), torch.ones(m, lo // 64),
        torch.zeros(n, r, dtype=torch.bfloat16), torch.zeros(n, lo // 2, dtype=torch.int8), torch.ones(n, lo // 64),
        None, 64))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_dispatch_packed_tiles_fit_in_shared_memory(sm90, monkeypatch, out_dtype):
    """ops.dispatch at 4096 x 3072 (where its rule takes 256-token tiles): the compiled kernel fits in an H100's
    shared memory for a bf16 output (256-token tiles) and for a float32 one (kept at 128 tokens: 256 would need
    294 912 bytes)."""
    from convrot_compiler.kernels.sm90 import packed_gemm
    from convrot_compiler.kernels.triton import int_gemm
    from convrot_compiler.ops import dispatch

    monkeypatch.setattr(dispatch, "use_sm90_packed_gemm", lambda *a: True)
    monkeypatch.setattr(int_gemm, "programs", lambda device: 132)
    monkeypatch.setattr(int_gemm, "check_device", lambda *tensors: None)  # CPU tensors go on to the stand-in's launch
    m, k, n = 4096, 3072, 3072
    with pytest.raises(_ReachedLaunch):
        dispatch.int_gemm(torch.zeros(m, k, dtype=torch.int8), torch.ones(m),
                          [torch.zeros(n, k // 2, dtype=torch.int8)], [torch.ones(n)], [None], True, 256, out_dtype)
    # dispatch's rule reads the default tile from its own copy: packed_gemm is imported only where Gluon runs
    assert (packed_gemm.DEFAULT_CONFIG.BN, packed_gemm.DEFAULT_CONFIG.BM) == (dispatch.PACKED_TILE,) * 2
    assert dispatch.packed_gemm_config(False, 2) is packed_gemm.DEFAULT_CONFIG
    (compiled,) = packed_gemm._packed_gemm_kernel.device_caches[0][0].values()
    assert compiled.metadata.shared <= packed_gemm.SMEM_LIMIT
    assert (compiled.metadata.shared > 200_000) == (out_dtype == torch.bfloat16)  # the 256-token tile's stages
