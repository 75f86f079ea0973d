"""A sampler or a drafter added in one new file is reachable everywhere with no other file touched (issue 21):
``blockdiff sample --help`` (its flags), ``blockdiff config keys``, the server's request fields, and generation
itself (``model.generate(sampler=...)``, ``speculative_generate(..., drafter=...)``), because all of them read the
registries when used (docs/design.md §9, §14).

The plugin below is written to its own module in ``tmp_path`` and imported; nothing else knows its names.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
from test_speculative import VOCAB, ar_model, copy_drafter, hf_greedy

from blockdiff.cli import main
from blockdiff.sampling.samplers.registry import all_knobs, sampler_names, settings, unregister_sampler
from blockdiff.sampling.speculative import drafter_names, speculative_generate, unregister_drafter
from blockdiff.serving.protocol import parse_request

PLUGIN = textwrap.dedent('''
    """A throwaway sampler and a throwaway drafter, each registered by its own decorator."""

    from dataclasses import dataclass
    from typing import Any

    import torch

    from blockdiff.sampling.samplers.base import Sampler, knob, reveal
    from blockdiff.sampling.samplers.registry import register_sampler
    from blockdiff.sampling.speculative.base import Draft, Drafter
    from blockdiff.sampling.speculative.registry import register_drafter
    from blockdiff.sampling.speculative.verify import CausalLMVerifier


    @register_sampler
    @dataclass
    class LeftmostPlugin(Sampler):
        name = "leftmost_plugin"
        plugin_width: int = knob(1, "plugin sampler: masked positions revealed per step, leftmost first")

        def step(self, tokens, confidence, state, generator, probs=None):
            rank = state.masked.long().cumsum(-1)
            return reveal(state, tokens, confidence, state.masked & (rank <= self.plugin_width))


    @register_drafter
    @dataclass(eq=False)
    class EchoPlugin(Drafter):
        """Drafts copies of the last committed token; a separate verifier checks them."""

        name = "echo_plugin"
        verifier: Any = None
        echo_count: int = knob(2, "plugin drafter: copies of the last committed token drafted per step")

        def __post_init__(self):
            self.verifier = CausalLMVerifier(self.verifier)
            self.drafter_forwards = 0

        @classmethod
        def fits(cls, model, verifier):
            return False  # only when named

        @classmethod
        def from_config(cls, model, config, verifier=None):
            return cls(verifier, **cls.knob_values(config))

        verifier_model = property(lambda self: self.verifier.model)
        vocab_size = property(lambda self: self.verifier.vocab_size)
        verifier_forwards = property(lambda self: self.verifier.forwards)
        processed = property(lambda self: self.verifier.processed)
        max_cache = property(lambda self: self.verifier.max_cache)

        def reset(self):
            self.verifier.reset()

        def propose(self, committed, limit, sampling, generator=None):
            return Draft(torch.tensor([committed[-1]] * max(0, min(self.echo_count, limit)), dtype=torch.long))

        def score(self, committed, drafts):
            return self.verifier.score(committed, drafts)

        def commit(self, committed, accepted):
            self.verifier.commit(committed)
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "blockdiff_plugin_for_test.py").write_text(PLUGIN, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("blockdiff_plugin_for_test")
    try:
        yield module
    finally:
        unregister_sampler("leftmost_plugin")
        unregister_drafter("echo_plugin")
        sys.modules.pop("blockdiff_plugin_for_test", None)


def test_the_plugin_is_in_the_registries_and_the_generation_settings(plugin):
    assert "leftmost_plugin" in sampler_names() and "echo_plugin" in drafter_names()
    assert {"plugin_width", "echo_count"} <= set(all_knobs()) and settings()["echo_count"] == 2


def test_the_plugin_is_in_blockdiff_sample_help(plugin, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--plugin-width" in out and "leftmost_plugin" in out
    assert "--echo-count" in out and "echo_plugin" in out and "plugin drafter: copies" in out


def test_the_plugin_is_in_blockdiff_config_keys(plugin, capsys):
    assert main(["config", "keys", "--markdown"]) in (0, None)
    out = capsys.readouterr().out
    assert "| `plugin_width` | `1` | leftmost_plugin sampler:" in out
    assert "| `echo_count` | `2` | echo_plugin drafter:" in out


def test_the_plugin_is_in_the_servers_request_fields(plugin):
    body = {"model": "m", "prompt": "hi", "plugin_width": 3, "echo_count": 4, "sampler": "leftmost_plugin"}
    request = parse_request(body, chat=False, served_model="m")
    assert request.settings["plugin_width"] == 3 and request.settings["echo_count"] == 4
    assert request.settings["sampler"] == "leftmost_plugin"


def test_the_plugin_sampler_and_drafter_generate(plugin):
    from conftest import tiny_model

    model = tiny_model()
    out = model.generate([[1, 2, 3]], sampler="leftmost_plugin", plugin_width=2, max_new_tokens=8, seed=0)
    assert int(out.lengths[0]) == 8
    verifier = ar_model()
    prompt, new = [3, 9, 27, 1], 12
    out = speculative_generate(verifier, copy_drafter(verifier), prompt, drafter="echo_plugin", echo_count=3,
                               max_new_tokens=new)
    assert out.sequences[0].tolist() == hf_greedy(verifier, prompt, new)  # lossless whatever drafts
    assert out.drafted_tokens > 0 and out.drafter_forwards == 0 and VOCAB == verifier.config.vocab_size
