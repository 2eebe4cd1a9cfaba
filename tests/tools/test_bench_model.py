"""CPU smoke test of the model benchmark harness (timings are not asserted)."""

import json
import sys

import pytest

from convrot_compiler.tools import bench_model


def test_model_bench_runs_and_writes_consistent_results(tmp_path):
    result = bench_model.main(["--config", "flux-tiny", "--resolution", "128", "--text-tokens", "16",
                               "--variants", "bf16,w4a4,w4a4-whole,fp8", "--iters", "2", "--device", "cpu",
                               "--out", str(tmp_path), "--name", "smoke"])
    data = json.loads((tmp_path / "smoke.json").read_text())
    md = (tmp_path / "smoke.md").read_text()
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["bf16"]["rel_err_vs_bf16"] < 0.05  # bf16 eager against itself: only run-to-run noise
    assert 0 < rows["w4a4"]["rel_err_vs_bf16"] < 0.1
    assert rows["w4a4"]["weight_ratio_vs_bf16"] < 0.3
    assert rows["w4a4"]["speedup_vs_bf16"] > 0
    assert rows["bf16"]["ms"] > 0 and rows["w4a4"]["ms"] > 0
    whole = rows["w4a4-whole"]  # the same layers quantized as w4a4, the forward compiled as one graph
    assert 0 < whole["rel_err_vs_bf16"] < 0.1 and "the whole forward as one graph" in whole["note"]
    assert whole["weight_ratio_vs_bf16"] == rows["w4a4"]["weight_ratio_vs_bf16"]
    assert "fp8" in rows and (rows["fp8"]["ms"] is None) == rows["fp8"]["note"].startswith("skipped")
    assert "w4a4" in md and "x bf16-compile" in md
    assert result["rows"] == data["rows"]


@pytest.mark.parametrize("config,frames,res,tokens", [("qwen-image-tiny", 1, "128", 64 + 16),
                                                      ("wan-tiny", 5, "96x160", 2 * 6 * 10 + 16)])
def test_model_bench_takes_another_familys_config(tmp_path, config, frames, res, tokens):
    """Another family's built-in config through the same harness: its own inputs at a square or height x width
    size, its tokens per sample (a video's latent frames included), the modulation weight-only by its role."""
    bench_model.main(["--config", config, "--resolution", res, "--text-tokens", "16", "--frames", str(frames),
                      "--variants", "bf16,w4a4", "--iters", "1", "--device", "cpu", "--out", str(tmp_path),
                      "--name", "family"])
    rows = {r["variant"]: r for r in json.loads((tmp_path / "family.json").read_text())["rows"]}
    assert rows["w4a4"]["tokens"] == tokens and rows["w4a4"]["ms"] > 0
    assert 0 < rows["w4a4"]["rel_err_vs_bf16"] < 0.1 and rows["w4a4"]["weight_ratio_vs_bf16"] < 0.5


def test_a_variant_that_fails_is_recorded_as_skipped_and_the_run_goes_on(tmp_path, monkeypatch):
    prepare = bench_model.prepare

    def failing(variant, model, inputs=None):
        if variant == "mix":
            raise ValueError("mix: this plan cannot compile here\nsecond line")
        return prepare(variant, model, inputs)

    monkeypatch.setattr(bench_model, "prepare", failing)
    result = bench_model.main(["--config", "flux-tiny", "--resolution", "64", "--text-tokens", "16",
                               "--variants", "bf16,mix,w4a4-fp8attn", "--iters", "1", "--device", "cpu",
                               "--out", str(tmp_path), "--name", "skip"])
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["mix"]["ms"] is None and rows["mix"]["note"] == "skipped: mix: this plan cannot compile here"
    assert rows["w4a4-fp8attn"]["ms"] > 0 and "attention in fp8" in rows["w4a4-fp8attn"]["note"]
    assert 0 < rows["w4a4-fp8attn"]["rel_err_vs_bf16"] < 0.1
    assert "skipped: mix" in (tmp_path / "skip.md").read_text()


def test_convrot_bench_cli_forwards_to_the_harness(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "convrot_compiler", "bench", "--config", "flux-tiny", "--resolution",
                           "128", "--text-tokens", "16", "--variants", "bf16", "--iters", "1", "--device", "cpu",
                           "--out", str(tmp_path), "--name", "cli"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "cli.json").read_text())["rows"][0]["variant"] == "bf16"
    bad = subprocess.run([sys.executable, "-m", "convrot_compiler", "bench", "--variants", "int3", "--device", "cpu",
                          "--config", "flux-tiny"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown variant" in bad.stderr


def _result(name, rows):
    env = {"gpu": "test", "torch": "x", "triton": "x", "diffusers": "x", "date": "x"}
    return {"env": env, "config": "flux-dev", "device": "cuda", "rows": rows, "breakdowns": []}


def test_merge_combines_calls_and_reports_latency_per_token(tmp_path):
    def row(variant, res, ms, batch=1, **extra):
        tokens = (res // 16) ** 2 + 512
        return {"variant": variant, "resolution": res, "batch": batch, "tokens": tokens, "ms": ms,
                "us_per_token": ms * 1e3 / (tokens * batch), "weight_bytes": 1, "weight_ratio_vs_bf16": 1.0,
                "rel_err_vs_bf16": 0.1, **extra}

    calls = {"call_a": _result("a", [row("bf16-compile", 1024, 131.0), row("w4a4", 1024, 87.0,
                                                                        **{"speedup_vs_bf16-compile": 131 / 87})]),
             "call_b": _result("b", [row("w4a4", 512, 28.6, **{"speedup_vs_bf16-compile": 1.64})])}
    paths = []
    for name, data in calls.items():
        paths.append(str(tmp_path / f"{name}.json"))
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    bench_model.main(["--merge", *paths, "--out", str(tmp_path), "--name", "merged"])
    md = (tmp_path / "merged.md").read_text()
    table = md.split("Latency per token")[0]
    assert sum(line.startswith("| call_") for line in table.splitlines()) == 3
    growth = md.split("Latency per token")[1]
    line = next(x for x in growth.splitlines() if x.startswith("| w4a4 "))
    w4a4 = calls["call_a"]["rows"][1]
    assert f"{w4a4['us_per_token']:.2f} ({131 / 87:.2f}x)" in line and "(1.64x)" in line
    assert "1024² batch 1" in growth and "512² batch 1" in growth


def test_merge_refuses_files_that_are_not_results(tmp_path):
    import pytest

    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit):
        bench_model.main(["--merge", str(bad), "--out", str(tmp_path)])


def test_resolutions_are_square_or_height_by_width():
    import argparse

    assert bench_model.resolution("1024") == bench_model.resolution("1024x1024") == 1024
    assert bench_model.resolution("480x832") == "480x832"
    with pytest.raises(argparse.ArgumentTypeError, match="480x832"):
        bench_model.resolution("480p")


def test_kernel_groups_and_the_top_kernels_table():
    group = bench_model.kernel_group
    assert group("_tiles_kernel") == group("_w4a16_row_kernel") == "weight-only GEMV"
    assert group("_int_gemm_kernel") == group("_packed_gemm_kernel") == "quantized GEMM"
    assert group("_int_gemm_tma_kernel") == "quantized GEMM"
    assert group("_rotate_quant_kernel") == "rotate+quantize"
    assert group("_rms_rope_kernel") == "Q, K RMSNorm+RoPE"
    assert group("_unpack_int4_kernel") == "int4 unpack"
    assert group("void pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert group("sm90_xmma_gemm_bf16bf16_bf16f32") == "bf16 GEMM (cuBLAS)"
    assert group("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN") == "bf16 GEMM (cuBLAS)"  # cuBLAS 13
    inductor = bench_model.INDUCTOR_FUSED
    assert group("triton_poi_fused_gelu_view_7") == inductor
    # named after the SDPA / custom op they feed, but RMSNorm + RoPE and LayerNorm + modulation
    assert group("triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention__to_copy_add_") == inductor
    assert group("triton_red_fused_add_cat_mul_native_layer_norm_rotate_quantize_slice_split") == inductor
    assert group("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert group("void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy") == "other"
    env = {"gpu": "test", "torch": "x", "triton": "x", "diffusers": "x", "date": "x"}
    result = {"env": env, "config": "flux-tiny", "rows": [], "breakdowns": [{
        "variant": "w4a4", "forward_ms": 3.0, "kernels_ms": {"quantized GEMM": 2.0, "other": 1.0},
        "top_kernels": [{"kernel": "_int_gemm_kernel", "group": "quantized GEMM", "ms": 2.0, "calls": 7},
                        {"kernel": "triton_poi_fused_gelu_view_7", "group": "other", "ms": 1.0, "calls": 3}]}]}
    result["breakdowns"].append({"variant": "bf16-compile", "forward_ms": 5.0,
                                 "kernels_ms": {"bf16 GEMM (cuBLAS)": 4.0, "attention": 1.0}})
    md = bench_model.to_markdown(result)
    assert "The kernels taking the most time" in md
    assert "w4a4, CUDA kernel time of one forward (kernels sum to 3.0 ms" in md
    baseline = md[md.index("bf16-compile, CUDA kernel time of one forward (kernels sum to 5.0 ms"):]
    first_part = [c.strip() for c in baseline.splitlines()[4].strip("|").split("|")]
    assert first_part == ["bf16 GEMM (cuBLAS)", "4", "80%"]
    line = next(li for li in md.splitlines() if "triton_poi_fused_gelu_view_7" in li)
    assert [c.strip() for c in line.strip("|").split("|")] == ["triton_poi_fused_gelu_view_7", "other", "1.00", "3"]


def test_profile_breaks_down_bf16_compile_and_each_w4a4_variant_once():
    from convrot_compiler.tools.bench_model import _profiles

    done = [{"variant": "w4a4"}]
    assert _profiles("w4a4-dirotq", done) and _profiles("bf16-compile", done)
    assert not _profiles("w4a4", done) and not _profiles("mix", done) and not _profiles("bf16", done)


def test_the_calibrated_variants_calibrate_on_the_measured_inputs_and_say_so():
    from convrot_compiler.tools.bench_model import prepare
    from convrot_compiler.tools.models import build_flux, make_flux_inputs

    model = build_flux("flux-tiny", seed=0)
    inputs = make_flux_inputs(model, 64, 64, 16).kwargs
    with pytest.raises(ValueError, match="calibrates on the measured inputs"):
        prepare("w4a4-dirotq", build_flux("flux-tiny", seed=0))
    fn, prepared, note = prepare("w4a4-dirotq", model, inputs)
    assert "DiRotQ" in note and prepared > 0
    assert any(d.extra.get("method") == "dirotq" for d in model.convrot_decisions)


@pytest.mark.parametrize("launch", sorted(bench_model.LAUNCHES))
def test_every_launch_suffix_sets_real_options(launch):
    """A variant's suffix passes its options to convrot_compiler.compile: each must be an option it takes, with a
    value it accepts (a misspelt one would fail only on the GPU machine). The calibrated launches get their
    calibration when they run; here they are taken as prepared."""
    from convrot_compiler.config import ConvRotConfig
    from convrot_compiler.numerics.pca import needs_calibration

    options, _ = bench_model.LAUNCHES[launch]
    calibrated = needs_calibration(options.get("rotation", "regular"), options.get("weights", "rtn"))
    ConvRotConfig(**options, **({"prepared": True} if calibrated else {}))


def test_kernel_choice_replaces_dispatch_rules_for_its_block_only():
    """``tile128`` turns off the packed GEMM's 256-token tiles and ``tritonrq`` the sm_90 rotate+quantize inside
    the block; both come back after it (a renamed dispatch rule would leave the launch comparing nothing)."""
    from convrot_compiler.ops import dispatch

    assert dispatch.packed_gemm_wide_tokens(4096, 9216, False, 132)
    with bench_model.kernel_choice("tile128"):
        assert not dispatch.packed_gemm_wide_tokens(4096, 9216, False, 132)
    assert dispatch.packed_gemm_wide_tokens(4096, 9216, False, 132)
    rotate = dispatch.use_sm90_rotate
    with bench_model.kernel_choice("tritonrq"):
        assert dispatch.use_sm90_rotate is not rotate
    assert dispatch.use_sm90_rotate is rotate


def test_interleaved_timing_rotates_the_order_and_runs_each_under_its_launch(monkeypatch):
    """time_interleaved: a warm-up round, then ``iters`` rounds of one call each, the first of a round moving on by
    one every round; each call runs inside its own launch's kernel choice."""
    import contextlib

    import torch

    calls, launches = [], []

    @contextlib.contextmanager
    def recording(launch):
        launches.append(launch)
        yield

    monkeypatch.setattr(bench_model, "kernel_choice", recording)

    def variant(name):
        return lambda **kw: calls.append(name)

    times = bench_model.time_interleaved([("a", variant("a")), ("b", variant("b")), ("c", variant("c"))], {},
                                         torch.device("cpu"), 3)
    assert [len(t) for t in times] == [3, 3, 3] and all(x >= 0 for t in times for x in t)
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert launches == calls


def test_model_bench_interleaved_holds_every_variant_and_times_them_in_turns(tmp_path):
    result = bench_model.main(["--config", "flux-tiny", "--resolution", "64", "--text-tokens", "16",
                               "--variants", "w4a4,w4a4-fp8attn", "--iters", "2", "--device", "cpu", "--interleave",
                               "--out", str(tmp_path), "--name", "interleaved"])
    rows = {r["variant"]: r for r in result["rows"]}
    for r in rows.values():
        assert r["ms"] > 0 and r["first_call_s"] > 0 and "timed interleaved with the other variants" in r["note"]
        assert r["peak_bytes"] is None and 0 < r["rel_err_vs_bf16"] < 0.1
    assert "attention in fp8" in rows["w4a4-fp8attn"]["note"]
    assert rows["w4a4-fp8attn"]["rel_err_vs_bf16"] != rows["w4a4"]["rel_err_vs_bf16"]
    assert json.loads((tmp_path / "interleaved.json").read_text())["rows"] == result["rows"]


@pytest.mark.parametrize("known", [bench_model.VARIANTS, ("bf16", "w4a4", "w4a4-fp8attn", "mix-fp8attn", "fp8")])
def test_an_unknown_variant_lists_what_is_known_and_only_that(known):
    with pytest.raises(SystemExit) as exit_info:
        bench_model.parse_variants("bf16,foo", known)
    message = str(exit_info.value)
    assert message.startswith("unknown variant(s) foo; choose from ")
    menu = message.split("choose from ", 1)[1]
    listed, _, grouped = menu.partition(", or <plan>-<launch> with a plan of ")
    named = set(listed.split(", "))
    if grouped:
        plans, launches = grouped.split(" and a launch of ")
        named |= {f"{p}-{launch}" for p in plans.split(", ") for launch in launches.split(", ")}
    assert named == set(known)
