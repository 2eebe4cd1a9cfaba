"""Reference numerics: symmetric quantizers, the int4 packing layout, and the
reference quantized linear. Plain torch, written for clarity; every kernel is
checked against these functions.

Conventions (those of the ConvRot reference code):
* Activations: per token (row), symmetric, scale = absmax(row) / qmax over the
  whole rotated row, round half to even, values in [-qmax, qmax].
* Weights: per output channel, symmetric, absmax / qmax, round half to even.
* qmax = 7 for int4 (the value -8 is never used), 127 for int8.
* Output = float32(int32 accumulator) * token scale * channel scale (+ bias),
  multiplied in that order, returned in the input dtype.

Zero rows get scale 0 and all-zero values, never NaN. A row holding any NaN or
+-Inf gets a NaN scale and zero values, so its output row is all NaN (as it would
be in bf16) and every other row is unaffected.

Int4 packing layout (weights). A row of K int4 values (K a multiple of the
group size G) is stored as K/2 int8 bytes. In group g, byte j holds value
g*G + j in its low nibble and value g*G + G/2 + j in its high nibble. Unpacking a
byte tile is two shifts, ``lo = (b << 4) >> 4`` and ``hi = b >> 4`` (arithmetic
shifts sign-extend), and the low and high nibbles of a tile of bytes multiply
two *contiguous* tiles of int8 activations, so the GEMM's K loop needs no
register shuffle and its activation loads stay plain. Activations are kept as
int8 containers (values in [-7, 7] for int4): see kernels/triton/int_gemm.py for the
measurement behind that choice.

Weight-only weights have a second layout, ``"tiles"``: the A fragments of mma.m16n8k16, what the
tensor-core W4A16 and W8A16 kernels read (kernels/sm90/weight_only.py), as int32 words for 4 bits
(``pack_int4_tiles``) and int64 double words for 8 (``pack_int8_tiles``). ``QuantizedWeight.layout`` says
which layout a weight is in; ``pack_values`` and ``unpack_values`` write and read either.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .rotations import Rotation

QMAX = {4: 7, 8: 127}
Scheme = Literal["w4a4", "w8a8", "w4a16", "w8a16"]
SCHEME_BITS: dict[str, tuple[int, int | None]] = {"w4a4": (4, 4), "w8a8": (8, 8), "w4a16": (4, None), "w8a16": (8, None)}
WEIGHT_ONLY: tuple[str, ...] = ("w4a16", "w8a16")  # activations stay in float: no rotation, per-group weight scales


def qmax(bits: int) -> int:
    try:
        return QMAX[bits]
    except KeyError:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}") from None


def quantize_symmetric(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest quantization of each row (last dimension).

    Returns (values as int8, scale as float32 with shape x.shape[:-1])."""
    m = qmax(bits)
    xf = x.float()
    absmax = xf.abs().amax(dim=-1)
    finite = torch.isfinite(xf).all(dim=-1)
    scale = torch.where(finite, absmax / m, torch.full_like(absmax, float("nan")))
    usable = finite & (scale > 0)
    safe = torch.where(usable, scale, torch.ones_like(scale))
    q = torch.round(xf / safe.unsqueeze(-1)).clamp_(-m, m)
    q = torch.where(usable.unsqueeze(-1), q, torch.zeros_like(q))
    return q.to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 values of row-quantized data."""
    return q.float() * scale.unsqueeze(-1)


def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """Pack int4 values (an int8 tensor in [-8, 7]) two per byte along the last dimension; see module doc."""
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 takes int8 values, got {q.dtype}")
    k = q.shape[-1]
    if group_size < 2 or group_size % 2 or k % group_size:
        raise ValueError(f"last dimension {k} must be a multiple of an even group size, got {group_size}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack_int4 values must lie in [-8, 7]")
    g = q.reshape(*q.shape[:-1], k // group_size, 2, group_size // 2)
    lo = g[..., 0, :].to(torch.int16) & 0xF
    hi = g[..., 1, :].to(torch.int16) << 4
    return (lo | hi).to(torch.uint8).view(torch.int8).reshape(*q.shape[:-1], k // 2)


def unpack_int4(p: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of ``pack_int4``."""
    if p.dtype != torch.int8:
        raise TypeError(f"unpack_int4 takes packed int8 bytes, got {p.dtype}")
    half = group_size // 2
    kb = p.shape[-1]
    if group_size < 2 or group_size % 2 or kb % half:
        raise ValueError(f"packed width {kb} must be a multiple of group_size/2 = {half}")
    lo = torch.bitwise_right_shift(torch.bitwise_left_shift(p, 4), 4).reshape(*p.shape[:-1], kb // half, 1, half)
    hi = torch.bitwise_right_shift(p, 4).reshape(*p.shape[:-1], kb // half, 1, half)
    return torch.cat((lo, hi), dim=-2).reshape(*p.shape[:-1], kb * 2)


TILE_ROWS, TILE_K = 16, 64  # output channels x inputs per tile of pack_int4_tiles


PACK_TILES_ROWS = 64 * TILE_ROWS


def pack_int4_tiles(q: torch.Tensor) -> torch.Tensor:
    """Int4 values [N, K] (int8 in [-8, 7], K a multiple of 64) in the tile layout of the W4A16
    tensor-core GEMV (kernels/sm90/weight_only.py): int32 words [ceil(N / 16), K / 64, 32, 4].

    Word (b, c, lane, s) is what lane ``lane`` of a warp holds as the A operand of mma.m16n8k16's
    step s over the tile of channels 16b .. 16b + 15 and inputs 64c .. 64c + 63, so that a lane
    loads 16 contiguous bytes and decodes them without exchanging data with other lanes. With
    g = lane // 4 and t = lane % 4, nibble i of the word holds the value at channel
    16b + g + 8 (i % 2) and input 64c + 16t + 4s + 2 ((i % 4) // 2) + i // 4, stored as value + 8
    (0..15): ``(w >> 4i) & 0x000F000F | 0x43004300`` is then two bf16 values (value + 136) in the
    register order mma expects. Input k of lane t's four steps are 16 contiguous activations. Rows
    past N are zero."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"pack_int4_tiles takes 2-D int8 values, got {q.dtype} of shape {tuple(q.shape)}")
    n, k = q.shape
    if k % TILE_K:
        raise ValueError(f"the tile layout needs K a multiple of {TILE_K}, got {k}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack_int4_tiles values must lie in [-8, 7]")
    if n > PACK_TILES_ROWS:  # its int64 working copies, several times 8x the values, a block of rows at a time
        return torch.cat([pack_int4_tiles(q[i:i + PACK_TILES_ROWS]) for i in range(0, n, PACK_TILES_ROWS)])
    nb = -(-n // TILE_ROWS)
    u = torch.nn.functional.pad(q.to(torch.int64) + 8, (0, 0, 0, nb * TILE_ROWS - n), value=8)
    # channel = 16b + 8 rh + g, input = 64c + 16t + 4s + 2 eh + half; nibble i = rh + 2 eh + 4 half
    u = u.reshape(nb, 2, 8, k // TILE_K, 4, 4, 2, 2)  # b, rh, g, c, t, s, eh, half
    u = u.permute(0, 3, 2, 4, 5, 7, 6, 1).reshape(nb, k // TILE_K, 32, 4, 8)  # b, c, lane, s, (half, eh, rh)
    words = (u << (4 * torch.arange(8, device=q.device))).sum(-1)
    return (words - ((words >= 2**31).to(torch.int64) << 32)).to(torch.int32)


def unpack_int4_tiles(t: torch.Tensor, out_features: int) -> torch.Tensor:
    """Inverse of ``pack_int4_tiles``: int8 values [out_features, K]."""
    if t.dtype != torch.int32 or t.dim() != 4 or tuple(t.shape[2:]) != (32, 4):
        raise ValueError(f"tile-layout weights are int32 [N/16, K/64, 32, 4], got {t.dtype} {tuple(t.shape)}")
    nb, kc = t.shape[:2]
    if not nb * TILE_ROWS - TILE_ROWS < out_features <= nb * TILE_ROWS:
        raise ValueError(f"{nb} tiles of {TILE_ROWS} channels do not hold {out_features} output channels")
    w = t.to(torch.int64) & 0xFFFFFFFF
    u = (w.unsqueeze(-1) >> (4 * torch.arange(8, device=t.device))) & 0xF  # b, c, lane, s, nibble
    u = u.reshape(nb, kc, 8, 4, 4, 2, 2, 2)  # b, c, g, t, s, half, eh, rh
    u = u.permute(0, 7, 2, 1, 3, 4, 6, 5).reshape(nb * TILE_ROWS, kc * TILE_K)
    return (u[:out_features] - 8).to(torch.int8)


def pack_int8_tiles(q: torch.Tensor) -> torch.Tensor:
    """Int8 values [N, K] (K a multiple of 64) in the tile layout of the W8A16 tensor-core GEMV
    (kernels/sm90/weight_only.py): int64 double words [ceil(N / 16), K / 64, 32, 4].

    Double word (b, c, lane, s) is lane ``lane``'s A operand of mma.m16n8k16's step s over channels
    16b .. 16b + 15 and inputs 64c .. 64c + 63, as in ``pack_int4_tiles``, one byte a value, stored as
    value + 128. With g = lane // 4 and t = lane % 4, byte p = rh + 2 el + 4 eh holds the value at channel
    16b + g + 8 rh and input 64c + 16t + 4s + 2 eh + el: then ``(w >> 8r) & 0x000F000F`` of its low (r = 0,
    1) or high (r = 2, 3 after taking the high word) word holds the low nibbles of A register r's two
    values, and a further shift by 4 their high nibbles. Rows past N are zero."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"pack_int8_tiles takes 2-D int8 values, got {q.dtype} of shape {tuple(q.shape)}")
    n, k = q.shape
    if k % TILE_K:
        raise ValueError(f"the tile layout needs K a multiple of {TILE_K}, got {k}")
    nb = -(-n // TILE_ROWS)
    u = torch.nn.functional.pad((q.view(torch.uint8) ^ 0x80), (0, 0, 0, nb * TILE_ROWS - n), value=0x80)
    u = u.reshape(nb, 2, 8, k // TILE_K, 4, 4, 2, 2)  # b, rh, g, c, t, s, eh, el
    u = u.permute(0, 3, 2, 4, 5, 6, 7, 1).contiguous()  # b, c, g, t, s, (eh, el, rh)
    return u.reshape(nb, k // TILE_K, 32, 4, 8).view(torch.int64).squeeze(-1)


def unpack_int8_tiles(t: torch.Tensor, out_features: int) -> torch.Tensor:
    """Inverse of ``pack_int8_tiles``: int8 values [out_features, K]."""
    if t.dtype != torch.int64 or t.dim() != 4 or tuple(t.shape[2:]) != (32, 4):
        raise TypeError(f"expected int64 tiles [N/16, K/64, 32, 4], got {t.dtype} {tuple(t.shape)}")
    nb, kc = t.shape[:2]
    u = t.contiguous().view(torch.uint8).reshape(nb, kc, 8, 4, 4, 2, 2, 2)  # b, c, g, t, s, eh, el, rh
    u = u.permute(0, 7, 2, 1, 3, 4, 5, 6).reshape(nb * TILE_ROWS, kc * TILE_K)
    return (u[:out_features] ^ 0x80).view(torch.int8)


def packed_layout(values: torch.Tensor) -> str:
    """Which layout prepared weight values are in, told apart by dtype: ``"tiles"`` (int32 words of
    ``pack_int4_tiles`` or int64 double words of ``pack_int8_tiles``) or ``"groups"`` (int8: ``pack_int4``'s
    bytes, or 8-bit values as they are)."""
    return "tiles" if values.dtype in (torch.int32, torch.int64) else "groups"


def pack_values(q: torch.Tensor, bits: int, group_size: int, layout: str) -> torch.Tensor:
    """Int8 values [N, K'] of ``bits`` in ``layout``."""
    if layout == "tiles":
        return pack_int4_tiles(q) if bits == 4 else pack_int8_tiles(q)
    return pack_int4(q, group_size) if bits == 4 else q


def unpack_values(values: torch.Tensor, bits: int, group_size: int, out_features: int) -> torch.Tensor:
    """Int8 values [N, K'] of prepared values in either layout (``packed_layout``)."""
    if packed_layout(values) == "tiles":
        return unpack_int4_tiles(values, out_features) if bits == 4 else unpack_int8_tiles(values, out_features)
    return unpack_int4(values, group_size) if bits == 4 else values


WEIGHT_ONLY_LAYOUTS = ("groups", "tiles")


def check_layout(layout: str, scheme: str, group_size: int) -> None:
    """The tile layout is for weight-only schemes with groups of a multiple of ``TILE_K``."""
    if layout not in WEIGHT_ONLY_LAYOUTS:
        raise ValueError(f"layout must be one of {WEIGHT_ONLY_LAYOUTS}, got {layout!r}")
    if layout == "tiles" and (scheme not in WEIGHT_ONLY or group_size % TILE_K):
        raise ValueError(f"the tile layout is for w4a16 and w8a16 with group_size a multiple of {TILE_K}, got "
                         f"{scheme} with group_size {group_size}")

ACT_ORDERS = ("natural", "mma")
MMA_ORDER_GROUP = 256


def mma_channel_order(device: torch.device | str | None = None) -> torch.Tensor:
    """Position p -> channel of a 256-channel group stored in the ``"mma"`` order (int64 [256]).

    The sm_90 rotate+quantize kernel (kernels/sm90/rotate_quant.py) ends with a group as the accumulator
    of mma.m16n8k16 over W [16, 16], W[r, c] the rotated channel 16 c + r: lane 4 g + t holds rows g and
    g + 8, columns 2 t, 2 t + 1, 2 t + 8 and 2 t + 9 (PTX's m16n8 accumulator fragment, twice along
    the columns). Written in channel order those 8 values land 16 bytes apart, 8 one-byte stores per
    lane and a quarter of every sector; in this order the lane's values are positions 8 (4 g + t) .. + 7,
    register i = c0 + 2 r8 + 4 c8 (c = 8 c8 + 2 t + c0, r = 8 r8 + g): one 8-byte store. A GEMM reading
    values in this order takes weights whose input channels were permuted the same way
    (``quantize_weight(act_order="mma")``), which leaves every dot product unchanged."""
    p = torch.arange(MMA_ORDER_GROUP, device=device)
    lane, reg = p // 8, p % 8
    g, t = lane // 4, lane % 4
    c0, r8, c8 = reg % 2, (reg // 2) % 2, reg // 4
    return 16 * (8 * c8 + 2 * t + c0) + 8 * r8 + g


def check_act_order(order: str, group_size: int) -> None:
    if order not in ACT_ORDERS:
        raise ValueError(f"act_order must be one of {ACT_ORDERS}, got {order!r}")
    if order == "mma" and group_size != MMA_ORDER_GROUP:
        raise ValueError(f"the 'mma' channel order is defined on groups of {MMA_ORDER_GROUP} channels, "
                         f"not {group_size}")


def to_act_order(t: torch.Tensor, order: str, group_size: int) -> torch.Tensor:
    """t [..., K'] (K' a multiple of group_size, channels in natural order) with each group's channels in
    ``order``: position p of group j holds channel j * G + mma_channel_order()[p]. Activations
    and weights go through the same function, so a GEMM over both computes the same dot products."""
    return _reorder_groups(t, order, group_size, inverse=False)


def from_act_order(t: torch.Tensor, order: str, group_size: int) -> torch.Tensor:
    """Inverse of ``to_act_order``: each group's channels back in natural order."""
    return _reorder_groups(t, order, group_size, inverse=True)


def _reorder_groups(t: torch.Tensor, order: str, group_size: int, inverse: bool) -> torch.Tensor:
    check_act_order(order, group_size)
    if order == "natural":
        return t
    k = t.shape[-1]
    if k % group_size:
        raise ValueError(f"width {k} is not a multiple of the group size {group_size}")
    idx = mma_channel_order(t.device)
    if inverse:
        idx = torch.argsort(idx)
    return t.reshape(*t.shape[:-1], k // group_size, group_size)[..., idx].reshape(t.shape)


WeightQuantizer = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor]"]
"""(weight [N, K'] float32 in the rotated space, bits) -> (int8 values [N, K'], scale [N]).
Round-to-nearest (``quantize_symmetric``) is ConvRot's; GPTQ-style quantizers plug in here."""


def rtn_weight_quantizer(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_symmetric(w, bits)


@dataclass
class QuantizedWeight:
    """A linear's weight, rotated, quantized and (for 4 bits) packed.

    ``values``: int8 [N, K'] for 8 bits, packed int8 [N, K'/2] for 4 bits (``pack_int4``), or for
    w4a16 and w8a16 in ``layout="tiles"`` int32 or int64 [ceil(N/16), K'/64, 32, 4] (``pack_int4_tiles``,
    ``pack_int8_tiles``: what the tensor-core weight-only kernels read).
    ``scale``: float32 [N] (per output channel), or [N, K'/group_size] for w4a16,
    whose scales cover ``group_size`` input channels each.
    ``act_order``: the order of the input channels within each group (``to_act_order``), which the
    activations quantized for this weight must share: ``"natural"``, or ``"mma"`` (w4a4/w8a8 only).
    """

    scheme: str
    values: torch.Tensor
    scale: torch.Tensor
    in_features: int
    out_features: int
    padded_in_features: int
    group_size: int
    rotation: Rotation | None
    layout: str = "groups"
    act_order: str = "natural"

    @property
    def weight_bits(self) -> int:
        return SCHEME_BITS[self.scheme][0]

    @property
    def act_bits(self) -> int | None:
        return SCHEME_BITS[self.scheme][1]

    def int_values(self) -> torch.Tensor:
        """Unpacked int8 values [N, K'], input channels in ``act_order``."""
        return unpack_values(self.values, self.weight_bits, self.group_size, self.out_features)

    def graph_tensors(self) -> list[torch.Tensor]:
        """What a compiled graph takes for this weight, in order."""
        return [self.values, self.scale]

    def row_bounds(self) -> torch.Tensor:
        """``row_bounds`` of a W4A4 / W8A8 weight, computed once (again if its values or scales change, and at every
        call for inference tensors: ``contents_key``)."""
        if self.act_bits is None:
            raise ValueError(f"row bounds are for weights with quantized activations, not {self.scheme}")
        key = contents_key([self.values, self.scale])
        if key is None or getattr(self, "_row_bounds_key", None) != key:
            self._row_bounds = row_bounds(self.values, self.scale, self.weight_bits == 4)
            self._row_bounds_key = key
        return self._row_bounds

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.scale.numel() * self.scale.element_size()


def prepared_shapes(scheme: str, out_features: int, in_features: int, group_size: int,
                    layout: str = "groups") -> tuple[tuple[int, ...], torch.dtype, tuple[int, ...]]:
    """(values shape, values dtype, scale shape) of a prepared weight, without preparing it."""
    _check_scheme(scheme)
    kp = -(-in_features // group_size) * group_size
    if layout == "tiles":
        values = ((-(-out_features // TILE_ROWS), kp // TILE_K, 32, 4),
                  torch.int32 if SCHEME_BITS[scheme][0] == 4 else torch.int64)
    else:
        values = ((out_features, kp // 2 if SCHEME_BITS[scheme][0] == 4 else kp), torch.int8)
    scale = (out_features, kp // group_size) if scheme in WEIGHT_ONLY else (out_features,)
    return values[0], values[1], scale


def quantized_nbytes(scheme: str, out_features: int, in_features: int, group_size: int, layout: str = "groups") -> int:
    """Bytes of a prepared weight (values + scales), without preparing it."""
    shape, dtype, scale = prepared_shapes(scheme, out_features, in_features, group_size, layout)
    return math.prod(shape) * dtype.itemsize + 4 * math.prod(scale)


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEME_BITS:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {tuple(SCHEME_BITS)}")


def quantize_weight(
    weight: torch.Tensor,
    scheme: str,
    rotation: Rotation | None,
    group_size: int = 256,
    weight_quantizer: WeightQuantizer = rtn_weight_quantizer,
    layout: str = "groups",
    act_order: str = "natural",
) -> QuantizedWeight:
    """Rotate (W4A4/W8A8) and quantize a [N, K] weight once, offline.

    Weight-only schemes (W4A16, W8A16) take no rotation: the activations stay in 16 bits,
    so there is no activation outlier to spread; their weights get one scale per
    output channel and per ``group_size`` input channels instead, and a ``layout``: ``"groups"``
    (``pack_int4``, or int8 values as they are) or ``"tiles"`` (``pack_values``, for the tensor-core kernels).

    ``act_order`` (W4A4/W8A8): the quantized values' input channels are put in that order within each
    group (``to_act_order``) after quantization, so any per-output-channel quantizer gives the same
    values, only permuted."""
    _check_scheme(scheme)
    check_act_order(act_order, group_size)
    if act_order != "natural" and SCHEME_BITS[scheme][1] is None:
        raise ValueError(f"act_order={act_order!r} orders quantized activations; {scheme} has none")
    check_layout(layout, scheme, group_size)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    wbits, abits = SCHEME_BITS[scheme]
    if abits is None:
        if rotation is not None:
            raise ValueError(f"{scheme} is weight-only and takes no rotation (pass rotation=None)")
        kp = -(-k // group_size) * group_size
        w = torch.nn.functional.pad(weight.float(), (0, kp - k)).reshape(n, kp // group_size, group_size)
        q, scale = quantize_symmetric(w, wbits)
        q = q.reshape(n, kp)
    else:
        if rotation is None:
            raise ValueError(f"{scheme} needs a rotation (use rotation 'none' for no rotation)")
        w = rotation.apply(weight.float())
        kp = w.shape[-1]
        if kp % group_size:
            raise ValueError(f"rotated width {kp} is not a multiple of the group size {group_size}")
        q, scale = weight_quantizer(w, wbits)
        q = to_act_order(q, act_order, group_size)
    values = pack_values(q, wbits, group_size, layout)
    return QuantizedWeight(scheme, values, scale.float(), k, n, kp, group_size, rotation, layout, act_order)


def relayout(qweight: QuantizedWeight, act_order: str | None = None, layout: str | None = None) -> QuantizedWeight:
    """The same prepared weight with its input channels in ``act_order`` (w4a4/w8a8) and packed in ``layout``
    (w4a16, w8a16): the integer values moved, never quantized again, so every dot product is unchanged."""
    act_order = act_order or qweight.act_order
    layout = layout or qweight.layout
    if (act_order, layout) == (qweight.act_order, qweight.layout):
        return qweight
    if qweight.act_bits is None and act_order != "natural":
        raise ValueError(f"act_order={act_order!r} orders quantized activations; {qweight.scheme} has none")
    check_layout(layout, qweight.scheme, qweight.group_size)
    q = from_act_order(qweight.int_values(), qweight.act_order, qweight.group_size)
    q = to_act_order(q, act_order, qweight.group_size)
    values = pack_values(q, qweight.weight_bits, qweight.group_size, layout)
    return dataclasses.replace(qweight, values=values, layout=layout, act_order=act_order)


def quantize_activation(x: torch.Tensor, bits: int, rotation: Rotation) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate and per-token quantize a [M, K] activation. Returns (int8 values [M, K'], scale [M])."""
    return quantize_symmetric(rotation.apply(x), bits)


def integer_matmul(qa: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """Exact int8 x int8^T product with int32 semantics, returned as float32 as a kernel
    would convert its int32 accumulator (float64 holds every partial sum exactly)."""
    return (qa.double() @ qw.double().T).float()


def with_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A float32 GEMM result plus the bias in float32, as every reference GEMM ends."""
    return out if bias is None else out + bias.float()


def check_in_features(x: torch.Tensor, in_features: int) -> None:
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, weight expects {in_features}")


def reference_int_gemm(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype, gelu_from: int | None = None) -> torch.Tensor:
    """The quantized GEMM on unpacked int8 values: float32(qa @ qw^T) * sa * sw (+ bias), in out_dtype;
    GELU (tanh form, in float32) on output columns >= gelu_from when given."""
    out = with_bias(integer_matmul(qa, qw) * sa.unsqueeze(-1) * sw.unsqueeze(0), bias)
    if gelu_from is not None:
        out = torch.cat([out[:, :gelu_from], torch.nn.functional.gelu(out[:, gelu_from:], approximate="tanh")], -1)
    return out.to(out_dtype)


def contents_key(tensors: list[torch.Tensor | None]) -> tuple | None:
    """What a value derived from ``tensors`` is kept under: each one's storage and version counter (None for a
    missing one); it changes when one is replaced or modified in place. None when one is an inference tensor, which
    keeps no version counter: what is derived from it is derived again each time."""
    if any(t is not None and t.is_inference() for t in tensors):
        return None
    return tuple(None if t is None else (t.data_ptr(), t._version) for t in tensors)


def row_bounds(values: torch.Tensor, scale: torch.Tensor, packed: bool) -> torch.Tensor:
    """scale x the sum of |W| over each row, float32 [N], for a W4A4 / W8A8 weight's integer values (``values``: int8
    [N, K], or int4 [N, K / 2] two to a byte, ``packed``) and channel scales: what quantized_linear_bound takes."""
    v = values
    if packed:  # the low nibble as a signed value: ((n & 15) ^ 8) - 8; the high one by the arithmetic shift
        magnitudes = ((v.bitwise_and(15).bitwise_xor(8) - 8).abs() + v.bitwise_right_shift(4).abs()).to(torch.int32)
    else:
        magnitudes = v.to(torch.int32).abs()
    return scale.float() * magnitudes.sum(-1).float()


def quantized_linear_bound(act_scales: torch.Tensor, bounds: torch.Tensor, bias: torch.Tensor | None,
                           act_bits: int) -> torch.Tensor:
    """A bound on |y| for the quantized GEMM y = (q @ W^T) * act_scales * scale (+ bias) with |q| <= qmax(act_bits):
    max(act_scales) x qmax x max(``bounds``, the weight's row_bounds) + max |bias|, a float32 scalar. It holds for
    any activations; y's rounding to 16 bits may pass it by 2^-8 relative."""
    bound = act_scales.float().amax() * qmax(act_bits) * bounds.float().amax()
    return bound if bias is None else bound + bias.float().abs().amax()


def concat_biases(biases: list, sizes: list[int], device: torch.device) -> torch.Tensor | None:
    """The biases of linears whose outputs sit side by side (one GEMM for several linears) as one
    vector, zeros for a linear without one, in the dtype of the first bias; None when none has one."""
    dtype = next((b.dtype for b in biases if b is not None), None)
    if dtype is None:
        return None
    if len(biases) == 1:
        return biases[0]
    return torch.cat([b.to(dtype) if b is not None else torch.zeros(n, dtype=dtype, device=device)
                      for b, n in zip(biases, sizes)])


def weight_only_gemm(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     group_size: int, bits: int = 4) -> torch.Tensor:
    """Weight-only reference (W4A16, or W8A16 with ``bits`` 8): x [M, K] @ dequant(values)^T (+ bias),
    dequantized per (channel, group) in float32; output in x's dtype. 4-bit values in either layout
    (``unpack_values``)."""
    n = scale.shape[0]
    q = unpack_values(values, bits, group_size, n)
    w = (q.float().reshape(n, -1, group_size) * scale.unsqueeze(-1)).reshape(n, -1)
    return with_bias(x.float() @ w[:, : x.shape[-1]].T, bias).to(x.dtype)


def reference_linear(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The quantized linear y = x W^T + b, computed the reference way; output in x's dtype."""
    check_in_features(x, qweight.in_features)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if qweight.act_bits is None:
        out = weight_only_gemm(x2, qweight.values, qweight.scale, bias, qweight.group_size, qweight.weight_bits)
    else:
        qa, sa = quantize_activation(x2, qweight.act_bits, qweight.rotation)
        qa = to_act_order(qa, qweight.act_order, qweight.group_size)
        out = reference_int_gemm(qa, sa, qweight.int_values(), qweight.scale, bias, x.dtype)
    return out.reshape(*lead, qweight.out_features)
