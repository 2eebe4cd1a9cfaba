"""convrot calibrate, and DiRotQ / GPTQ from the command line (generate, inspect), on the tiny random pipeline."""

import pytest

from convrot_compiler.calibration import Calibration
from convrot_compiler.tools import calibrate_cli, cli, generate

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.fixture(scope="module")
def cal_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "tiny.cal.safetensors"
    result = calibrate_cli.main(["--out", str(path), "--steps", "2", "--no-progress", "--device", "cpu"])
    assert result["layers"] == 34 and result["inputs"] == 20
    return path


def test_calibrate_writes_a_calibration_of_the_pipelines_transformer(cal_file, capsys):
    cal = Calibration.load(str(cal_file))
    assert cal.model["class"] == "FluxTransformer2DModel" and len(cal.layers) == 34
    assert cal.tokens["transformer_blocks.0.attn.add_q_proj"] == 3 * 2 * 32  # prompts x steps x text tokens
    with pytest.raises(FileNotFoundError, match="folder does not exist"):
        calibrate_cli.main(["--out", "/nonexistent/dir/cal.safetensors"])


def test_generate_and_inspect_take_dirotq_with_the_calibration(cal_file, tmp_path, capsys):
    result = generate.main(["--rotation", "pca-hadamard", "--weights", "gptq", "--calibration", str(cal_file),
                            "--steps", "2", "--out", str(tmp_path / "img.png"), "--no-progress", "--device", "cpu"])
    assert (tmp_path / "img.png").exists() and result.step_ms > 0
    capsys.readouterr()
    assert cli.main(["inspect", "--config", "flux-tiny", "--height", "64", "--width", "64", "--text-tokens", "16",
                     "--rotation", "pca", "--calibration", str(cal_file)]) == 0
    out = capsys.readouterr().out
    assert "pca (64 x 1 in bf16, rtn)" in out and "the calibration covers 34 of the 34 linears" in out
    assert cli.main(["inspect", "--config", "flux-tiny", "--height", "64", "--width", "64", "--text-tokens", "16",
                     "--weights", "gptq", "--calibration", str(cal_file)]) == 0
    assert "regular + gptq" in capsys.readouterr().out
    assert cli.main(["generate", "--rotation", "pca", "--steps", "2", "--device", "cpu"]) == 2
    assert "--calibration FILE" in capsys.readouterr().err
