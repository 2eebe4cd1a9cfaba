"""The "mma" channel order of quantized activations (quant.mma_channel_order): what the sm_90 rotate+quantize
kernel stores with whole sectors. Its definition against PTX's fragment rule, the reference and the kernels
writing it (the interpreted Triton kernel on CPU; on a GPU whichever kernel ops/dispatch.py picks), the
weights prepared in it, and the compiler and eager modules choosing it, all giving the same linear."""

import pytest
import torch
from torch import nn

import convrot_compiler as cc
from convrot_compiler.compiler import inductor_pass, weights
from convrot_compiler.compiler.backend import REPORTS
from convrot_compiler.nn import linear
from convrot_compiler.numerics.hadamard import hadamard_matrix
from convrot_compiler.numerics.quant import (
    from_act_order,
    mma_channel_order,
    quantize_weight,
    reference_linear,
    to_act_order,
)
from convrot_compiler.numerics.rotations import GroupHadamardRotation
from convrot_compiler.ops import custom_ops, dispatch, quantize_activation
from convrot_compiler.ops.dispatch import rotate_quantize
from convrot_compiler.tools.inspection import inspect

DEV = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("fresh_dynamo", "no_grad")  # conftest: Dynamo reset, no_grad


def test_mma_order_is_the_accumulator_fragment_of_each_lane():
    """Position 8 lane + i holds accumulator register i of that lane. PTX's m16n8 accumulator: c0, c1 at row
    lane / 4, columns 2 (lane % 4) + {0, 1}; c2, c3 eight rows below; a [16, 16] tile is two m16n8 tiles side
    by side (registers 4..7 eight columns right). The kernel's W[r, c] is rotated channel 16 c + r."""
    expected = torch.empty(256, dtype=torch.int64)
    for lane in range(32):
        for i in range(8):
            row = lane // 4 + 8 * ((i % 4) // 2)
            col = 2 * (lane % 4) + i % 2 + 8 * (i // 4)
            expected[8 * lane + i] = 16 * col + row
    assert torch.equal(mma_channel_order(), expected)
    assert torch.equal(torch.sort(expected).values, torch.arange(256))


def test_orders_round_trip_and_refuse_what_they_cannot_order():
    t = torch.arange(3 * 512).reshape(3, 512)
    mma = to_act_order(t, "mma", 256)
    assert not torch.equal(mma, t) and torch.equal(from_act_order(mma, "mma", 256), t)
    assert torch.equal(mma[:, 256:] - 256, mma[:, :256])  # each group on its own
    assert to_act_order(t, "natural", 256) is t
    with pytest.raises(ValueError, match="groups of 256"):
        to_act_order(t, "mma", 64)
    with pytest.raises(ValueError, match="act_order must be one of"):
        to_act_order(t, "lanes", 256)
    with pytest.raises(ValueError, match="multiple of the group size"):
        to_act_order(t[:, :300], "mma", 256)


@pytest.mark.parametrize("scheme", ["w4a4", "w8a8"])
def test_weights_in_mma_order_hold_the_same_values_and_give_the_same_linear(scheme):
    torch.manual_seed(0)
    w, x, bias = torch.randn(40, 700), torch.randn(3, 700), torch.randn(40)
    rot = GroupHadamardRotation("regular", 256)
    natural = quantize_weight(w, scheme, rot)
    mma = quantize_weight(w, scheme, rot, act_order="mma")
    assert mma.act_order == "mma" and torch.equal(mma.scale, natural.scale)
    assert torch.equal(mma.int_values(), to_act_order(natural.int_values(), "mma", 256))
    assert not torch.equal(mma.int_values(), natural.int_values())
    assert torch.equal(reference_linear(x, mma, bias), reference_linear(x, natural, bias))


def test_weight_quantizer_sees_natural_order():
    """A plugged-in quantizer (GPTQ-like, order-dependent) gets the rotated weight in natural order; the
    permutation is applied to its output."""
    seen = []

    def quantizer(w, bits):
        seen.append(w.clone())
        return custom_ops.quantize_symmetric(w, bits)

    w = torch.randn(8, 512)
    rot = GroupHadamardRotation("regular", 256)
    quantize_weight(w, "w4a4", rot, weight_quantizer=quantizer, act_order="mma")
    assert torch.equal(seen[0], rot.apply(w.float()))


def test_weight_order_refuses_what_it_cannot_order():
    w = torch.randn(8, 512)
    with pytest.raises(ValueError, match="w4a16 has none"):
        quantize_weight(w, "w4a16", None, act_order="mma")
    with pytest.raises(ValueError, match="groups of 256"):
        quantize_weight(w, "w4a4", GroupHadamardRotation("regular", 64), group_size=64, act_order="mma")


def _int_valued(m, k, seed):
    return torch.randint(-8, 9, (m, k), generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["regular", "sylvester"])
@pytest.mark.parametrize("m,k", [(1, 256), (19, 300), (3, 1300)])
def test_kernel_writes_the_mma_order_exactly(bits, kind, m, k):
    """Integer-valued rows rotate exactly, so the kernel must equal the reference in both orders bit for bit."""
    x = _int_valued(m, k, seed=m + k)
    x[min(3, m - 1)] = 0.0
    h = GroupHadamardRotation(kind, 256).kernel_matrix()
    q_ref, s_ref = custom_ops.rotate_quantize_reference(x, h, 256, bits, "mma")
    assert torch.equal(from_act_order(q_ref, "mma", 256), custom_ops.rotate_quantize_reference(x, h, 256, bits)[0])
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32  # bf16: the sm_90 kernel's input on an H100
    q, s = rotate_quantize(x.to(DEV, dtype), h.to(DEV), 256, bits, order="mma")
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)
    q_op, s_op = custom_ops.rotate_quantize(x.to(DEV), h.to(DEV), 256, bits, "mma")  # the custom op, either device
    assert torch.equal(q_op.cpu(), q_ref) and torch.equal(s_op.cpu(), s_ref)


def test_a_concatenation_is_written_in_the_mma_order_too():
    """The concatenation form stores through the same addresses: in mma order it gives the natural-order
    values permuted, bit for bit, from the same kernel."""
    g = torch.Generator().manual_seed(7)
    h = hadamard_matrix("regular", 16).to(DEV)
    x = (torch.randn(6, 512, generator=g) * 3).bfloat16().to(DEV)
    kw = dict(x2=(torch.randn(6, 768, generator=g) * 3).bfloat16().to(DEV))
    q_nat, s_nat = rotate_quantize(x, h, 256, 4, **kw)
    q_mma, s_mma = rotate_quantize(x, h, 256, 4, order="mma", **kw)
    assert torch.equal(q_mma, to_act_order(q_nat, "mma", 256)) and torch.equal(s_mma, s_nat)


def test_kernel_refuses_the_mma_order_without_its_groups():
    x = torch.randn(2, 256).to(DEV)
    with pytest.raises(ValueError, match="groups of 256"):
        rotate_quantize(x, hadamard_matrix("regular", 64).to(DEV), 64, 4, order="mma")
    with pytest.raises(ValueError, match="Kronecker factor"):
        rotate_quantize(x, None, 256, 4, order="mma")


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(512, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(), nn.Linear(256, 512))


def test_compiler_prepares_and_quantizes_in_the_chosen_order(monkeypatch):
    """On CPU the natural order is chosen; forcing "mma" (what an sm_90 GPU gets) must give the same output
    bit for bit, with weights and activations both permuted, and say so in the report and the inspect table."""
    x = torch.randn(2, 7, 512)
    results = {}
    for order in ("natural", "mma"):
        monkeypatch.setattr(weights, "act_order_for", lambda *args, order=order: order)
        results[order] = cc.compile(_model(), plan="w4a4", progress=False, regional=False)(x)
        report = REPORTS[-1]
        assert [d.extra.get("act_order") for d in report.decisions if d.precision != "bf16"] == [order] * 3
        quantizations = [n for n in report.graph_modules["after"].graph.nodes
                         if n.op == "call_function" and n.target is quantize_activation]
        assert quantizations and all(n.args[-1] == order for n in quantizations)
        torch._dynamo.reset()
    assert torch.equal(results["natural"], results["mma"])
    assert "w4a4 (mma channel order)" in inspect(_model(), (x,), plan="w4a4").table()


def test_post_grad_pass_prepares_and_quantizes_in_the_chosen_order(monkeypatch):
    import torch._inductor.config as inductor_config

    x = torch.randn(2, 24, 512)
    results = {}
    for order in ("natural", "mma"):
        monkeypatch.setattr(weights, "act_order_for", lambda *args, order=order: order)
        p = inductor_pass.ConvRotInductorPass(plan="w4a4")
        with inductor_config.patch(freezing=True, post_grad_custom_post_pass=p, fx_graph_cache=False,
                                   **{"cpp.weight_prepack": False}):
            with torch.no_grad():
                results[order] = torch.compile(_model())(x)
        torch._dynamo.reset()
    torch.testing.assert_close(results["mma"], results["natural"], rtol=0, atol=0)


def test_eager_module_keeps_its_order_through_its_state_dict(monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(512, 64)
    x = torch.randn(3, 512)
    natural = cc.ConvLinear4bit.from_linear(lin)
    old = {k: v.clone() for k, v in natural.state_dict().items() if k != "_extra_state"}  # as saved before the order
    monkeypatch.setattr(linear, "act_order_for", lambda *args: "mma")
    mma = cc.ConvLinear4bit.from_linear(lin)
    assert natural.act_order == "natural" and mma.act_order == "mma"
    assert torch.equal(mma(x), natural(x))
    state = mma.state_dict()
    assert state["_extra_state"] == {"act_order": "mma"}
    natural.load_state_dict(state)  # the values and their order travel together
    assert natural.act_order == "mma" and torch.equal(natural(x), mma(x))
    assert natural.quantized_weight.act_order == "mma"
    mma.load_state_dict(old)  # saved before the order existed: natural-order weights, loaded strictly
    assert mma.act_order == "natural" and torch.equal(mma(x), natural(x))


def test_order_choice_follows_the_device():
    cpu = torch.device("cpu")
    assert dispatch.act_order_for(cpu, torch.bfloat16, 256, True) == "natural"
    assert dispatch.act_order_for(torch.device("meta"), torch.bfloat16, 256, True) == "natural"
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        sm90 = torch.cuda.get_device_capability() == (9, 0)
        assert dispatch.act_order_for(cuda, torch.bfloat16, 256, True) == ("mma" if sm90 else "natural")
        assert dispatch.act_order_for(cuda, torch.bfloat16, 256, False) == "natural"  # no rotation: no Gluon kernel
        assert dispatch.act_order_for(cuda, torch.float16, 256, True) == "natural"
        assert dispatch.act_order_for(cuda, torch.bfloat16, 64, True) == "natural"
