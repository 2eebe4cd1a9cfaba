import os

import pytest
import torch

# Without a GPU, Triton kernels run through the interpreter. Must be set before triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _assert_gelu_epilogue_close(out: torch.Tensor, ref: torch.Tensor, pre_gelu: torch.Tensor) -> None:
    """A GEMM's GELU epilogue against the exact reference: within float32 rounding under the
    interpreter; on a GPU within the hardware tanh's documented error too (tanh.approx.f32, 2^-11
    relative on tanh, so 2^-12 |x| on GELU(x); an H100 measured at most 5.6e-6)."""
    out, ref, pre_gelu = (t.float().cpu() for t in (out, ref, pre_gelu))
    err = (out - ref).abs()
    hardware = torch.cuda.is_available()  # kernels under test run on the GPU when there is one
    bound = 1e-5 * (1 + ref.abs()) + (2.0 ** -12 * pre_gelu.abs() if hardware else 0)
    worst = (err / bound).max().item()
    assert worst <= 1, f"GELU epilogue error {worst:.2f}x its bound"


@pytest.fixture
def fresh_dynamo():
    """Dynamo reset before and after the test: each compile starts from no cached graphs or guards."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def assert_gelu_epilogue_close():
    return _assert_gelu_epilogue_close


@pytest.fixture
def no_grad():
    """The test runs under torch.no_grad(), as a pipeline runs its transformer: compiled models are inference-only."""
    with torch.no_grad():
        yield
