"""Each command's --help describes it in whole sentences: the description is its module's first paragraph."""

import importlib

import pytest

from convrot_compiler.tools.cli_options import doc_summary

COMMANDS = ["bench_model", "bench_pipeline", "calibrate_cli", "evaluate", "generate", "sensitivity_cli"]


def test_doc_summary_joins_the_first_paragraph():
    doc = "First line of a sentence\n    that goes on here.\n\nSecond paragraph."
    assert doc_summary(doc) == "First line of a sentence that goes on here."


@pytest.mark.parametrize("name", COMMANDS)
def test_help_description_is_the_whole_first_paragraph(name, capsys):
    module = importlib.import_module(f"convrot_compiler.tools.{name}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["-h"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    summary = doc_summary(module.__doc__)
    assert summary in help_text
    assert summary.rstrip("`").endswith((".", "?", ":")), summary


@pytest.mark.parametrize("command", ["demo", "inspect", "quantize"])
def test_a_subcommands_help_opens_with_its_summary(command, capsys):
    from convrot_compiler.tools.cli import build_parser

    parser = build_parser()
    summary = next(a for a in parser._subparsers._group_actions[0]._choices_actions if a.dest == command).help
    with pytest.raises(SystemExit):
        parser.parse_args([command, "-h"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert summary and summary[1:] in help_text
