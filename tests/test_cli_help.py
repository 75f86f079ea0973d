"""``blockdiff --help``, ``blockdiff --version`` and ``import blockdiff`` are cheap (issue 20, item 13).

* ``--help`` and ``--version`` import none of torch, transformers, Lightning or ``datasets`` (in a fresh
  interpreter), and ``--help`` still lists every verb of ``COMMANDS`` with its one-line summary.
* ``blockdiff VERB --help`` still shows the verb's own flags (the sampler flags of ``sample``).
* ``import blockdiff`` imports none of them either, yet keeps its promise: transformers' ``AutoConfig`` /
  ``AutoModelForCausalLM`` give the block diffuser for an export, whichever of blockdiff and transformers is
  imported first and whichever transformers module is imported first; and a bad ``sample.sampler`` is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "lightning", "datasets")


def _python(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter with this checkout first on the path; it prints one JSON line last."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CLI = f"""
import contextlib, io, json, sys
from blockdiff.cli.app import COMMANDS, main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main(sys.argv[1:])
    except SystemExit as exit:
        code = exit.code
print(json.dumps({{"code": code, "out": out.getvalue(), "verbs": list(COMMANDS),
                  "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def test_help_imports_no_heavy_library_and_lists_every_verb_with_its_summary():
    got = _python(CLI, "--help")
    assert got["code"] == 0 and got["heavy"] == []
    help_text = " ".join(got["out"].split())  # argparse wraps lines
    from blockdiff.cli.app import COMMANDS

    assert got["verbs"] == list(COMMANDS) and len(COMMANDS) >= 12
    for name, verb in COMMANDS.items():
        summary = " ".join(verb.run.__doc__.strip().splitlines()[0].split())
        assert f"{name} {summary[:40]}" in help_text, name


def test_version_imports_no_heavy_library():
    from blockdiff import __version__

    got = _python(CLI, "--version")
    assert got == {**got, "code": 0, "out": f"blockdiff {__version__}\n", "heavy": []}


def test_a_verbs_own_help_still_shows_its_flags(capsys):
    from blockdiff.cli import main
    from blockdiff.sampling.samplers.registry import knobs

    with pytest.raises(SystemExit) as info:
        main(["sample", "--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--sampler" in help_text and all(f"--{k.replace('_', '-')}" in help_text for k in knobs())


def test_import_blockdiff_is_light_and_a_bad_sampler_is_still_refused():
    code = f"""
import json, sys
import blockdiff
light = [m for m in {HEAVY!r} if m in sys.modules]
from blockdiff.config import ConfigError, load_config
try:
    load_config([], ["sample.sampler=nope"])
except ConfigError as err:
    error = str(err)
print(json.dumps({{"light": light, "error": error, "all": sorted(blockdiff.__all__),
                  "resolved": [type(getattr(blockdiff, n)).__name__ for n in blockdiff.__all__]}}))
"""
    got = _python(code)
    assert got["light"] == [] and got["error"].startswith("sample.sampler must be one of threshold, ")
    assert len(got["resolved"]) == len(got["all"]) == 13  # every public name resolves


# Each load order: blockdiff first or transformers first, and a transformers module that imports the Auto
# classes from inside another module (``PreTrainedModel``: ``modeling_utils``; ``LlamaForCausalLM``; a
# tokenizer) before the Auto class is used.
AUTO = """
import json, sys
{first}
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(json.dumps([type(config).__name__, type(model).__name__]))
"""
ORDERS = {
    "blockdiff first": "import blockdiff",
    "transformers first": "import transformers.models.auto.modeling_auto\nimport blockdiff",
    "after PreTrainedModel": "import blockdiff\nfrom transformers import PreTrainedModel",
    "after a Llama class": "import blockdiff\nfrom transformers import LlamaForCausalLM",
    "after AutoTokenizer": "import blockdiff\nfrom transformers import AutoTokenizer",
    "after a blockdiff module": "import blockdiff.modeling.io",
}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("help_export"))


@pytest.mark.parametrize("order", ORDERS)
def test_after_import_blockdiff_the_auto_classes_give_the_block_diffuser_in_any_import_order(export, order):
    assert _python(AUTO.format(first=ORDERS[order]), str(export)) == ["BlockDiffusionConfig", "BlockDiffusionLM"]
