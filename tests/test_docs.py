"""The README's options table is the API: every field of ConvRotConfig, with its default, and the
backend's options among them."""

import dataclasses
import pathlib

from convrot_compiler import ConvRotConfig
from convrot_compiler.config import GRAPH_FIELDS

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _options_table() -> dict[str, tuple[str, str]]:
    text = README.read_text()
    section = text[text.index("## Options"):]
    section = section[:section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[1].strip("`"), cells[2])
    return rows


def test_the_options_table_lists_every_config_field_with_its_default():
    rows = _options_table()
    fields = {f.name: f.default for f in dataclasses.fields(ConvRotConfig)}
    assert list(rows) == list(fields)
    for name, default in fields.items():
        assert rows[name][0] == repr(default).replace("'", '"'), name


def test_the_options_the_backend_takes_are_those_not_marked_compile_only():
    rows = _options_table()
    backend = {name for name, (_, what) in rows.items() if "*compile only*" not in what}
    assert backend == set(GRAPH_FIELDS)


def test_the_readme_stays_short_and_points_to_existing_docs():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    root = README.parent
    for path in ("docs/ARCHITECTURE.md", "docs/NUMERICS.md", "docs/PERFORMANCE.md", "benchmarks/README.md"):
        assert path in text and (root / path).is_file(), path
