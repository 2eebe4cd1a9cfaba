"""W4A4 methods side by side: round-to-nearest without rotation, ConvRot, ConvRot + GPTQ, DiRotQ (PCA + GPTQ, with
and without a Hadamard on each int4 group). Every calibrated method is calibrated on data held out from what it
is scored on. CPU, the reference numerics and the eager modules (the compiled path computes the same, tested).

1. One linear on synthetic DiT-like activations (fidelity_synthetic.py's kinds, plus a dominant low-rank
   subspace), 4096 inputs: SQNR of y = x W^T against float64, calibrated on 2048 other tokens of the same kind.
2. all-MiniLM-L6-v2 (pretrained, offline): every linear quantized, calibrated on 32 sentences unlike the
   query/passage pairs it is scored on; cosine to the fp32 embeddings and top-1 retrieval.
3. The tiny FluxPipeline (random weights): calibrated during 4 prompts x 4 steps of denoising, scored on another
   prompt's transformer inputs at its middle step: error after the first 1 and 2 blocks, per-layer SQNR.

    python benchmarks/fidelity_methods.py [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics

import torch
from fidelity_minilm import PAIRS, embed, load  # benchmarks/fidelity_minilm.py
from fidelity_synthetic import activations, weights  # benchmarks/fidelity_synthetic.py

import convrot_compiler as cc
from convrot_compiler.nn.linear import make_quantized_linear
from convrot_compiler.numerics.pca import needs_calibration
from convrot_compiler.tools.bench_model import environment, write_results
from convrot_compiler.tools.cli_options import doc_summary

# name -> (rotation, weights, group size)
METHODS = {
    "RTN (no rotation)": ("none", "rtn", 256),
    "ConvRot": ("regular", "rtn", 256),
    "ConvRot + GPTQ": ("regular", "gptq", 256),
    "DiRotQ (PCA + GPTQ)": ("pca", "gptq", 64),
    "DiRotQ + Hadamard": ("pca-hadamard", "gptq", 64),
}
SYNTHETIC = ("channel outliers", "row offsets", "heavy tails", "mixed (DiT-like)", "low-rank subspace")
CALIBRATION_SENTENCES = [
    "The museum opens at nine and closes at five on weekdays.", "She planted tomatoes along the southern fence.",
    "Interest rates rose for the third month in a row.", "The orchestra tuned their instruments before the concert.",
    "A cold front will bring rain to the coast tonight.", "He repaired the bicycle chain with a borrowed tool.",
    "The committee postponed its decision until spring.", "Fresh snow covered the mountain pass overnight.",
    "The library added a new section on local history.", "Our flight was delayed by two hours because of fog.",
    "The recipe calls for three eggs and a cup of sugar.", "Engineers tested the bridge under heavy loads.",
    "The children built a fort out of cardboard boxes.", "A new species of frog was found in the rainforest.",
    "The software update fixed several security issues.", "They watched the sunset from the top of the hill.",
    "The train station was crowded on Friday evening.", "Doctors recommend drinking water throughout the day.",
    "The painter mixed blue and yellow to make green.", "Our team finished the project a week early.",
    "The river flooded the fields after heavy storms.", "He learned to play chess from his grandfather.",
    "The bakery sells out of croissants by noon.", "Scientists measured the temperature of the deep ocean.",
    "The old castle attracts thousands of tourists.", "She wrote a letter to the editor about traffic.",
    "The market was full of fresh fruit and spices.", "The startup raised money to expand overseas.",
    "A gentle breeze moved the curtains in the room.", "The marathon route passes through the old town.",
    "He forgot his umbrella and got soaked in the rain.", "The telescope revealed distant galaxies at night.",
]


def synthetic_activations(kind: str, m: int, k: int, seed: int) -> torch.Tensor:
    if kind != "low-rank subspace":
        return activations(kind, m, k, seed)
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(k, 64, generator=torch.Generator().manual_seed(99)))[0]  # one subspace
    return (torch.randn(m, 64, generator=g) * 20) @ basis.T + torch.randn(m, k, generator=g)


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    noise = (out.double() - ref).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def one_linear(k: int = 4096, n: int = 512, tokens: int = 512) -> list[dict]:
    rows = []
    w = weights(n, k).bfloat16()
    linear = torch.nn.Linear(k, n, bias=False).bfloat16()
    linear.weight.data.copy_(w)
    for kind in SYNTHETIC:
        cal_x = synthetic_activations(kind, 2048, k, seed=1).bfloat16().float()
        moment = (cal_x.T @ cal_x / 2048).unsqueeze(0) if k <= 3072 else _blocks(cal_x)
        x = synthetic_activations(kind, tokens, k, seed=2).bfloat16()
        ref = x.double() @ w.double().T
        for name, (rotation, wq, group) in METHODS.items():
            module = make_quantized_linear(linear, "w4a4", group, rotation, wq,
                                           moment if needs_calibration(rotation, wq) else None)
            with torch.no_grad():
                rows.append(dict(activations=kind, method=name, sqnr_db=sqnr_db(module(x), ref)))
    return rows


def _blocks(x: torch.Tensor) -> torch.Tensor:
    from convrot_compiler.numerics.pca import block_shape

    nb, b = block_shape(x.shape[1])
    xb = x.reshape(-1, nb, b).transpose(0, 1)
    return xb.transpose(1, 2) @ xb / x.shape[0]


def minilm() -> list[dict]:
    model, tok = load()
    q = tok([p[0] for p in PAIRS], padding=True, return_tensors="pt")
    d = tok([p[1] for p in PAIRS], padding=True, return_tensors="pt")
    ref_q, ref_d = embed(model, q), embed(model, d)
    cal_batch = tok(CALIBRATION_SENTENCES, padding=True, return_tensors="pt")
    cal = cc.calibrate(model, [dict(cal_batch)], plan=[("*", "w4a4")], progress=False)
    rows = []
    for name, (rotation, wq, _) in METHODS.items():
        m = copy.deepcopy(model)
        cc.quantize_model(m, [("*", "w4a4")], group_size=64, rotation=rotation, weights=wq,
                          calibration=cal if needs_calibration(rotation, wq) else None, progress=False)
        cq, cd = embed(m, q), embed(m, d)
        cos = torch.cat([(cq * ref_q).sum(-1), (cd * ref_d).sum(-1)])
        rows.append(dict(method=name, cos_mean=cos.mean().item(), cos_min=cos.min().item(),
                         top1_agreement=((cq @ cd.T).argmax(-1) == (ref_q @ ref_d.T).argmax(-1)).float().mean().item()))
    return rows


def tiny_pipeline() -> list[dict]:
    from convrot_compiler.sensitivity.layerwise import error_by_depth, layer_sqnr
    from convrot_compiler.tools.pipelines import capture_transformer_inputs, random_pipeline, random_prompt_embeds

    pipe = random_pipeline("flux-tiny", "cpu", 0)
    pipe.set_progress_bar_config(disable=True)
    prompts = random_prompt_embeds(pipe.transformer, 5, 32, "cpu", seed=3)
    call = dict(height=128, width=128, num_inference_steps=4, guidance_scale=3.5)
    with cc.Calibrator(pipe.transformer) as cal, torch.no_grad():
        for i, embeds in enumerate(prompts[:4]):
            pipe(**embeds, **call, generator=torch.Generator().manual_seed(i), output_type="latent")
    inputs = capture_transformer_inputs(pipe, dict(**prompts[4], **call, generator=torch.Generator().manual_seed(9)),
                                        step=2)
    rows = []
    for name, (rotation, wq, group) in METHODS.items():
        method = dict(weights=wq, calibration=cal if needs_calibration(rotation, wq) else None)
        depth = error_by_depth(pipe.transformer, kwargs=inputs, depths=(1, 2), group_size=group, rotation=rotation,
                               **method)
        sq = [s.sqnr_db for s in layer_sqnr(pipe.transformer, kwargs=inputs, group_size=group, rotation=rotation,
                                            **method) if s.precision == "w4a4"]
        rows.append(dict(method=name, err_block1=depth[1], err_block2=depth[2], sqnr_min=min(sq),
                         sqnr_median=statistics.median(sq)))
    return rows


def main(argv=None) -> dict:
    from tabulate import tabulate

    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    synthetic, mini, tiny = one_linear(), minilm(), tiny_pipeline()
    env = environment()
    kinds = list(dict.fromkeys(r["activations"] for r in synthetic))
    t1 = tabulate([[m, *(f"{next(r['sqnr_db'] for r in synthetic if r['method'] == m and r['activations'] == k):.1f}"
                         for k in kinds)] for m in METHODS],
                  headers=["SQNR dB, one linear 4096 -> 512", *kinds], tablefmt="github")
    t2 = tabulate([[r["method"], f"{r['cos_mean']:.4f}", f"{r['cos_min']:.4f}", f"{r['top1_agreement']:.2f}"]
                   for r in mini], headers=["all-MiniLM-L6-v2, all linears W4A4", "cos mean", "cos min",
                                             "top-1 = fp32"], tablefmt="github")
    t3 = tabulate([[r["method"], f"{r['err_block1']:.4f}", f"{r['err_block2']:.4f}", f"{r['sqnr_min']:.1f}",
                    f"{r['sqnr_median']:.1f}"] for r in tiny],
                  headers=["tiny FluxPipeline (w4a4 plan)", "err after 1 block", "err after 2 blocks",
                           "W4A4 layer SQNR dB min", "median"], tablefmt="github")
    md = (f"# W4A4 methods: RTN, ConvRot, ConvRot + GPTQ, DiRotQ (benchmarks/fidelity_methods.py)\n\nCPU | torch "
          f"{env['torch']} | {env['date']} | calibrated on held-out data; DiRotQ keeps 12.5% of each input's channels "
          f"in bf16, int4 groups of 64; ConvRot groups of 256 (64 on MiniLM, whose widths are 384 and 1536)\n\n"
          f"{t1}\n\n{t2}\n\n{t3}\n")
    result = {"env": env, "synthetic": synthetic, "minilm": mini, "tiny_pipeline": tiny}
    write_results("fidelity_methods", result, md, args.out)
    print(md)
    return result


if __name__ == "__main__":
    main()
