"""The README's config reference is generated from the config tree; keep them in sync."""

import contextlib
import io
import shlex
from pathlib import Path

from moslim_mega.cli import config_doc_markdown, main

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


def _between(text: str, name: str) -> str:
    return text.split(f"<!-- {name}:start -->\n", 1)[1].split(f"<!-- {name}:end -->", 1)[0]


def test_readme_megatron_layouts_are_what_the_planner_prints():
    """The table and the command outputs of "Megatron layouts for the paper's largest RMs"."""
    from moslim_mega.parallel.planner import megatron_table

    text = README.read_text()
    assert _between(text, "megatron-plan").strip() == megatron_table().strip(), (
        "README megatron layout table is stale: regenerate it with `moslim plan --paper-table --backend megatron`")
    block = _between(text, "megatron-plan-output").split("```text\n", 1)[1].split("```", 1)[0]
    runs = block.split("$ moslim ")[1:]
    assert len(runs) == 2
    for run in runs:
        command, _, shown = run.partition("\n")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(shlex.split(command)) == 0
        assert shown.strip() == out.getvalue().strip(), f"README output of `moslim {command}` is stale"
