"""CUDA-graph replay of a compiled forward: keys and errors on CPU, replay on the GPU."""

import warnings

import pytest
import torch

from convrot_compiler.compiler.cudagraphs import CUDAGraphReplay, NotReplayable, signature


def test_signature_separates_shapes_dtypes_values_and_grad_mode():
    a = torch.zeros(2, 3)
    assert signature((a,), {"flag": True}) == signature((torch.ones(2, 3),), {"flag": True})
    assert signature((a,), {"flag": True}) != signature((a,), {"flag": False})
    assert signature((a,), {}) != signature((torch.zeros(3, 2),), {})
    assert signature((a,), {}) != signature((a.double(),), {})
    assert signature((a,), {}) != signature((), {"x": a})
    with torch.no_grad():
        no_grad = signature((a,), {})
    with torch.inference_mode():
        inference = signature((a,), {})
    assert len({no_grad, inference, signature((a,), {})}) == 3
    with pytest.raises(NotReplayable, match="not hashable"):
        signature((), {"bad": bytearray(b"x")})


def test_calls_it_cannot_serve_run_directly_and_say_why_once():
    replay = CUDAGraphReplay(lambda x, flag=None: x * 2)
    with pytest.warns(UserWarning, match="one CUDA device"):
        assert torch.equal(replay(torch.ones(3)), torch.full((3,), 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(replay(torch.ones(3)), torch.full((3,), 2.0))  # remembered: no second warning
    with pytest.warns(UserWarning, match="not hashable"):
        assert torch.equal(replay(torch.ones(2), flag=bytearray(b"x")), torch.full((2,), 2.0))
    with pytest.raises(ValueError, match="max_graphs"):
        CUDAGraphReplay(lambda x: x, max_graphs=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_replay_matches_the_function_and_returns_fresh_outputs():
    calls = []

    def fn(x, scale=1.0):
        calls.append(1)
        return {"y": torch.relu(x) * scale + 1}

    replay = CUDAGraphReplay(fn)
    x = torch.randn(64, 32, device="cuda")
    first = replay(x)["y"]
    n_eager = len(calls)
    outs = [replay(x * k)["y"] for k in (1.0, 2.0, -1.0)]
    assert len(calls) == n_eager  # replays run no Python of fn
    for k, out in zip((1.0, 2.0, -1.0), outs):
        torch.testing.assert_close(out, torch.relu(x * k) + 1)
    torch.testing.assert_close(first, outs[0])
    assert outs[0].data_ptr() != outs[1].data_ptr()
    other = replay(torch.randn(8, 32, device="cuda"), scale=3.0)["y"]  # new signature: captured anew
    assert other.shape == (8, 32) and len(replay.graphs) == 2
