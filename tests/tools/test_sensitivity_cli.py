"""convrot sensitivity on a pipeline's real transformer inputs (--model with --prompt), and batching them."""

import pytest
import torch

from convrot_compiler.tools import sensitivity_cli
from convrot_compiler.tools.pipelines import batch_transformer_inputs, random_pipeline, random_prompt_embeds

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class _PromptedRandomPipeline:
    """The tiny random pipeline behind a text interface: each prompt stands for seeded random embeddings."""

    def __init__(self):
        self.pipe = random_pipeline("flux-tiny", "cpu", 0)
        self.pipe.set_progress_bar_config(disable=True)
        self.transformer = self.pipe.transformer
        self.prompts: list[str] = []

    def to(self, device):
        return self

    def set_progress_bar_config(self, **kw):
        pass

    def __call__(self, prompt: str, **kw):
        self.prompts.append(prompt)
        embeds = random_prompt_embeds(self.transformer, 1, 8, "cpu", seed=len(prompt))[0]
        return self.pipe(**embeds, **kw)


def test_prompts_are_captured_at_the_step_batched_and_measured(monkeypatch, tmp_path, capsys):
    fake = _PromptedRandomPipeline()
    monkeypatch.setattr(sensitivity_cli, "load_pipeline", lambda path: fake)
    report = sensitivity_cli.main(["--model", str(tmp_path), "--prompt", "a fox", "--prompt", "a lighthouse at dusk",
                                   "--steps", "4", "--height", "32", "--no-progress", "--device", "cpu"])
    assert fake.prompts == ["a fox", "a lighthouse at dusk"]
    assert "pipeline inputs at step 2 of 4, 2 prompt(s)" in capsys.readouterr().out
    assert len(report.layers) == 46 and 0 < report.plan_error < 1


def test_batching_concatenates_samples_and_refuses_mismatched_ids():
    a = {"hidden_states": torch.zeros(1, 4, 2), "timestep": torch.tensor([0.5]), "img_ids": torch.zeros(4, 3),
         "return_dict": False}
    b = {"hidden_states": torch.ones(1, 4, 2), "timestep": torch.tensor([0.25]), "img_ids": torch.zeros(4, 3),
         "return_dict": False}
    both = batch_transformer_inputs([a, b])
    assert both["hidden_states"].shape == (2, 4, 2) and both["timestep"].tolist() == [0.5, 0.25]
    assert both["img_ids"].shape == (4, 3) and both["return_dict"] is False
    with pytest.raises(ValueError, match="differ in 'img_ids'"):
        batch_transformer_inputs([a, dict(b, img_ids=torch.ones(4, 3))])
