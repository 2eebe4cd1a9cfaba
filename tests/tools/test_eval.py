"""convrot eval: image metrics, and the tiny random FluxPipeline end to end (CPU)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from convrot_compiler.compiler.backend import REPORTS
from convrot_compiler.tools.evaluate import format_eval, psnr, run_eval, ssim


def test_psnr_and_ssim_on_known_images():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 32, 32, generator=g)
    assert psnr(a, a) == math.inf and ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    shifted = a + 0.1  # MSE 0.01 -> 20 dB
    assert psnr(a, shifted) == pytest.approx(20.0, abs=1e-5)
    slightly = (a + 0.01 * torch.randn(3, 32, 32, generator=g)).clamp(0, 1)
    very = (a + 0.3 * torch.randn(3, 32, 32, generator=g)).clamp(0, 1)
    assert 1 > ssim(a, slightly) > ssim(a, very) > -1
    with pytest.raises(ValueError, match="one shape"):
        ssim(a, a[:, :16])


def test_tiny_pipeline_eval_scores_identical_runs_perfect_and_writes_images(tmp_path):
    last_before = REPORTS[-1] if REPORTS else None
    result = run_eval(plans=("w4a4",), prompts=["a", "b"], size=32, steps=2, device="cpu", out_dir=str(tmp_path),
                      progress=False)
    rows = {r["plan"]: r for r in result["rows"]}
    assert rows["bf16 (again)"]["psnr_min"] == math.inf and rows["bf16 (again)"]["ssim_min"] == pytest.approx(1.0)
    w4 = rows["w4a4"]
    assert w4["ms_per_step"] > 0 and rows["bf16 (again)"]["ms_per_step"] > 0
    assert math.isfinite(w4["psnr_mean"]) and w4["psnr_min"] > 20 and 0.9 < w4["ssim_min"] < 1
    assert sorted(w4["depth_errors"]) == [1, 2, 4] and all(0 < e < 0.5 for e in w4["depth_errors"].values())
    assert all(5 < s["min"] <= s["median"] < 80 for s in w4["sqnr_db"].values()) and len(w4["sqnr_db"]) > 10
    assert "err after 4 blk" in format_eval(result) and "SQNR dB min" in format_eval(result)
    assert REPORTS[-1] is not last_before and REPORTS[-1].rewritten > 0  # the pipeline ran the convrot-compiled transformer
    from PIL import Image

    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 * 32, 2 * 32)  # columns bf16, w4a4; rows: prompts
    assert (tmp_path / "w4a4_1.png").exists()
    assert json.loads((tmp_path / "eval.json").read_text())["rows"][1]["plan"] == "w4a4"


def test_eval_cli_refuses_bad_input(tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    proc = subprocess.run([sys.executable, "-m", "convrot_compiler", "eval", "--prompts", str(empty), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no prompts" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "convrot_compiler", "eval", "--model", str(tmp_path / "nope"),
                           "--device", "cpu", "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "not a diffusers pipeline folder" in proc.stderr
