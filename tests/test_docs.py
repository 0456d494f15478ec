"""The docs keep up with the code: every option `linearize compress --help` lists is documented,
and every `make` target README names exists."""

import argparse
import re
from pathlib import Path

import pytest

from linearize.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def docs_text() -> str:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n".join(page.read_text(encoding="utf-8") for page in pages)


def compress_help() -> str:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["compress"].format_help()


def listed_options(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text)) - {"--help"}


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, flags=re.MULTILINE))


def readme_make_targets() -> set[str]:
    """`make X` in running text and `make X` at the start of a line in a code block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    pairs = re.findall(r"`make ([\w-]+)|^make ([\w-]+)", text, flags=re.MULTILINE)
    return {name for pair in pairs for name in pair if name}


def test_document_every_compress_option():
    options = listed_options(compress_help())
    assert {"--layers", "--heal-steps", "--memory-budget"} <= options  # the help was read
    text = docs_text()
    missing = sorted(o for o in options if not re.search(re.escape(o) + r"(?![\w-])", text))
    assert not missing, f"options of `linearize compress` missing from README/docs: {missing}"


def test_name_only_existing_make_targets_in_readme():
    named = readme_make_targets()
    assert {"demo", "test"} <= named  # README was read
    missing = sorted(named - makefile_targets())
    assert not missing, f"README names make targets the Makefile lacks: {missing}"


@pytest.mark.parametrize(
    ("help_text", "expected"),
    [("  --layers K  --heal-steps N  -h, --help", {"--layers", "--heal-steps"})],
)
def test_read_options_from_help_text(help_text, expected):
    assert listed_options(help_text) == expected
