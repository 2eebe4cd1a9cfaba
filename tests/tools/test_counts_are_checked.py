"""A count of zero is refused before any work, not taken for "use the default" (``0 or default``) nor left to fail
late (a median of no timings)."""

import pytest

from convrot_compiler.tools import bench_model, bench_pipeline, calibrate_cli, cli, generate
from convrot_compiler.tools.evaluate import run_eval
from convrot_compiler.tools.models import image_tokens_for


@pytest.mark.parametrize("steps", [0, 1])
def test_generate_refuses_fewer_than_two_steps(steps):
    with pytest.raises(ValueError, match="--steps must be at least 2"):
        generate.run_generate(steps=steps, device="cpu")


@pytest.mark.parametrize("steps", [0, 1])
def test_eval_refuses_fewer_than_two_steps(steps):
    with pytest.raises(ValueError, match="--steps must be at least 2"):
        run_eval(steps=steps, device="cpu", progress=False)


def test_calibrate_refuses_zero_steps(tmp_path):
    with pytest.raises(ValueError, match="--steps must be at least 1"):
        calibrate_cli.main(["--steps", "0", "--out", str(tmp_path / "c.safetensors"), "--device", "cpu"])


@pytest.mark.parametrize("main", [bench_model.main, bench_pipeline.main])
def test_benchmarks_refuse_zero_iterations(main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--iters", "0", "--device", "cpu"])
    assert exit_info.value.code == 2 and "--iters must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("height,width", [(0, 64), (64, 0), (-16, 64)])
def test_image_sizes_must_be_positive(height, width):
    with pytest.raises(ValueError, match="positive multiples of 16"):
        image_tokens_for(height, width)


def test_generate_refuses_a_zero_height_from_the_command_line(capsys):
    assert cli.main(["generate", "--height", "0", "--device", "cpu"]) == 2
    assert "positive multiples of 16" in capsys.readouterr().err
