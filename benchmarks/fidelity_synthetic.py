"""Outlier suite: how each rotation keeps a quantized linear's output on DiT-like activations.

Activations with the structures reported for diffusion transformers (channel outliers, tokens
carrying a large common offset, heavy tails, near-constant rows, and a mix), weights with outlier
input channels; for W4A4 and W8A8, rotation none / Sylvester / regular at group sizes 16, 64, 256
and full width (QuaRot-style, one Hadamard over all K). Metric: relative error and SQNR of the
linear's output y = x W^T against float64. Runs on CPU (the reference numerics).

    python benchmarks/fidelity_synthetic.py [--tokens 256] [--k 4096] [--n 512] [--out DIR]
"""

from __future__ import annotations

import argparse
import math

import torch

from convrot_compiler.numerics.quant import quantize_weight, reference_linear
from convrot_compiler.numerics.rotations import GroupHadamardRotation
from convrot_compiler.tools.bench_model import environment, write_results
from convrot_compiler.tools.cli_options import doc_summary


def activations(kind: str, m: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if kind == "gaussian":
        return x
    if kind == "channel outliers":  # a few channels 50x larger, in every token
        idx = torch.randperm(k, generator=g)[: max(1, k // 256)]
        x[:, idx] *= 50
        return x
    if kind == "row offsets":  # a quarter of the tokens carry a common offset of 2-4 sigma in every channel
        x[::4] += 2.0 + 2.0 * torch.rand(x[::4].shape[0], 1, generator=g)
        return x
    if kind == "heavy tails":  # Student t, 2 degrees of freedom
        return _student_t(m, k, g)
    if kind == "near-constant rows":  # rows = c + tiny noise
        return torch.randn(m, 1, generator=g) * 3 + 0.01 * x
    if kind == "mixed (DiT-like)":
        x = activations("channel outliers", m, k, seed)
        x[::4] += 8.0 + 8.0 * torch.rand(x[::4].shape[0], 1, generator=g)
        return x
    raise ValueError(kind)


def _student_t(m, k, g, df=2.0):
    z = torch.randn(m, k, generator=g)
    chi2 = 2 * torch._standard_gamma(torch.full((m, k), df / 2), generator=g)
    return z / torch.sqrt(chi2 / df)


ACTIVATIONS = ("gaussian", "channel outliers", "row offsets", "heavy tails", "near-constant rows", "mixed (DiT-like)")


def weights(n: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, torch.randperm(k, generator=g)[: max(1, k // 512)]] *= 10  # outlier input channels
    return w


def evaluate(x: torch.Tensor, w: torch.Tensor, scheme: str, kind: str, group: int) -> tuple[float, float]:
    """(relative error, SQNR in dB) of the quantized linear against float64."""
    ref = x.double() @ w.double().T
    rot = GroupHadamardRotation(kind, group)
    out = reference_linear(x, quantize_weight(w, scheme, rot, group_size=group)).double()
    err = (out - ref).norm() / ref.norm()
    return err.item(), (-20 * math.log10(err.item())) if err > 0 else math.inf


def configurations(k: int):
    yield "none", "-", 256
    for kind in ("sylvester", "regular"):
        for g in (16, 64, 256):
            yield kind, str(g), g
        yield kind, f"full ({k})", k


def run(m: int, k: int, n: int, progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    if not (k & (k - 1) == 0 and (k.bit_length() - 1) % 2 == 0):
        raise SystemExit(f"--k must be a power of 4 (full-width regular Hadamard), got {k}")
    w = weights(n, k)
    jobs = [(a, s, c) for a in ACTIVATIONS for s in ("w4a4", "w8a8") for c in configurations(k)]
    rows = []
    cache = {}
    for act, scheme, (kind, label, group) in tqdm(jobs, desc="outlier suite", disable=not progress):
        x = cache.setdefault(act, activations(act, m, k))
        err, sqnr = evaluate(x, w, scheme, kind, group)
        rows.append(dict(activations=act, scheme=scheme, rotation=kind, group=label, rel_err=err, sqnr_db=sqnr))
    return rows


def to_markdown(rows: list[dict], env: dict, m: int, k: int, n: int) -> str:
    from tabulate import tabulate

    cols = sorted({(r["rotation"], r["group"]) for r in rows}, key=lambda c: (c[0] != "none", c[0], _gkey(c[1])))
    out = [f"# Outlier suite (benchmarks/fidelity_synthetic.py)\n\nReference numerics on CPU | torch {env['torch']} | "
           f"{env['date']} | x [{m}, {k}], W [{n}, {k}] | cell: SQNR of y = x W^T in dB (higher is better)\n"]
    for scheme in ("w4a4", "w8a8"):
        table = []
        for act in ACTIVATIONS:
            cell = {(r["rotation"], r["group"]): r for r in rows if r["activations"] == act and r["scheme"] == scheme}
            table.append([act] + [f"{cell[c]['sqnr_db']:.1f}" for c in cols])
        out.append(f"\n## {scheme}\n\n" + tabulate(table, headers=["activations"] + [
            f"{rot} {g}".strip() if rot != "none" else "none" for rot, g in cols], tablefmt="github") + "\n")
    return "".join(out)


def _gkey(label: str) -> int:
    return int(label.split()[0]) if label[0].isdigit() else 10**9


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--out")
    args = p.parse_args(argv)
    rows = run(args.tokens, args.k, args.n)
    env = environment()
    md = to_markdown(rows, env, args.tokens, args.k, args.n)
    write_results("fidelity_synthetic", {"env": env, "shape": [args.tokens, args.k, args.n], "rows": rows}, md,
                  args.out)
    print(md)
    return rows


if __name__ == "__main__":
    main()
