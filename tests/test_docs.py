"""Docs cannot rot: every config key is documented with its default, and the README names the two commands."""

from pathlib import Path

import pytest

from blockdiff.config import describe_keys

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("key,default,help_text", describe_keys())
def test_every_config_key_is_documented(key, default, help_text):
    assert help_text, f"{key} has no docstring in blockdiff/config/sections.py"
    assert f"| `{key}` | `{default}` |" in (ROOT / "docs" / "configuration.md").read_text(), (
        f"{key} (default {default}) is missing or stale in docs/configuration.md"
    )


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
