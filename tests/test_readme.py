"""The README's config reference is generated from the config tree; keep them in sync."""

from pathlib import Path

from moslim_mega.cli import config_doc_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_reference_matches_the_code():
    text = README.read_text()
    block = text.split("<!-- config-doc:start -->\n", 1)[1].split("<!-- config-doc:end -->", 1)[0]
    assert block.strip() == config_doc_markdown().strip(), (
        "README config reference is stale: regenerate it with `python -m moslim_mega.cli config doc --readme`"
    )


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
