"""Fuzz the command line (issue 15): whatever a user types, ``blockdiff`` answers, never with a traceback.

Property, for every command line tried: the exit status is 0 or 2; no ``Traceback`` on stdout or stderr;
and on status 2 stderr starts with ``error:``, stdout is empty and no file was written. Bounded and
derandomized (the same examples every run, under a minute on two CPU cores, no training):

* ``config validate`` / ``config show`` with overrides of every key from ``describe_keys()`` set to
  values of the wrong type (lists, mappings, strings, huge / negative ints, nan, inf, 1e308, interpolations),
  and arbitrary override strings;
* ``sample`` / ``eval`` against one tiny random model directory (made once for the module) with random
  ints (huge, negative, zero), floats (nan, inf, -0.0, 1e308, subnormals) and strings for their flags.

The crashes the search found (non-finite or out-of-range temperatures, a subnormal top_p, a huge
max_new_tokens, a block length <= 0) are fixed and kept as explicit cases at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from pathlib import Path

import pytest
from conftest import write_tiny_model_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockdiff.cli import main
from blockdiff.config import describe_keys

BOUNDED = dict(deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                      HealthCheck.function_scoped_fixture])
KEYS = [key for key, _, _ in describe_keys()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The working directory of every fuzzed command: it must stay empty."""
    return tmp_path_factory.mktemp("cwd")


def check_cli(argv: list[str], workdir: Path) -> int:
    """Run ``blockdiff ARGV`` in-process in ``workdir`` and assert the property; returns the exit status."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(workdir), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)  # an uncaught exception fails the test with its traceback
    out, err = out.getvalue(), err.getvalue()
    assert rc in (0, 2), (argv, rc, err)
    assert "Traceback" not in out + err, (argv, out, err)
    if rc == 2:
        assert err.startswith("error: "), (argv, err)
        assert out == "", (argv, out)
        assert not os.listdir(workdir), (argv, os.listdir(workdir))
    return rc


# -- config overrides -------------------------------------------------------------------------------------

def _yaml(value) -> str:
    """A value as the right-hand side of ``key=value`` (OmegaConf reads it as YAML)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, str):
        return value  # unquoted: YAML decides (a number, a list, an interpolation, a plain string)
    return json.dumps(value)


WRONG_TYPES = ["[1, 2]", "{a: 1}", "abc", ".nan", str(10**30), "-1", "${nowhere}"]  # more kinds in `values` below

values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=10),
    st.sampled_from([0, -1, 2**63, -0.0, 1e308, 5e-324, 1e23, "-.inf", "null", "{4: .nan}", "${data.max_seq_len}",
                     "${oc.env:HOME}", *WRONG_TYPES]),
    st.lists(st.one_of(st.integers(-5, 10**20), st.floats(allow_nan=False)), max_size=3),
    st.dictionaries(st.integers(-3, 20), st.floats(allow_nan=False, allow_infinity=False), max_size=3),
).map(_yaml)


@pytest.mark.parametrize("key", KEYS)
def test_every_key_with_values_of_the_wrong_type(key, workdir):
    for value in WRONG_TYPES:
        check_cli(["config", "validate", f"{key}={value}"], workdir)


@settings(max_examples=120, **BOUNDED)
@given(st.lists(st.tuples(st.sampled_from([*KEYS, "model.nope", "nosection.x", "model", "trainer"]), values),
                min_size=1, max_size=3),
       st.sampled_from(["validate", "show"]))
def test_config_overrides(workdir, pairs, action):
    check_cli(["config", action, *(f"{key}={value}" for key, value in pairs)], workdir)


any_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="\0"), max_size=30
)


@settings(max_examples=40, **BOUNDED)
@given(any_text, any_text)
def test_arbitrary_override_strings(workdir, key, value):
    check_cli(["config", "validate", f"model.block_length={value}"], workdir)
    check_cli(["config", "show", f"{key}={value}"], workdir)


# -- sample and eval flags --------------------------------------------------------------------------------

ints = st.one_of(
    st.integers(-3, 40), st.integers(), st.sampled_from([0, -1, 2**31, 2**32, 2**63 - 1, 2**63, -(2**63), 10**20])
)
floats = st.one_of(
    st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, 5e-324, 0.5, 0.9, 1.0])
)
SAMPLE_FLAGS = {
    "--temperature": floats,
    "--tau": floats,
    "--top-p": floats,
    "--top-k": ints,
    "--steps-per-block": ints,
    "--seed": ints,
    "--block-length": ints,
    "--window": ints,
    "--tokens-per-step": ints,
    # A huge but valid budget really generates that many tokens (minutes to forever): small ones only here.
    "--max-new-tokens": st.integers(-3, 12),
}
EVAL_FLAGS = {"--seed": ints, "--block-length": ints, "--max-batches": st.one_of(st.integers(-2, 2), ints)}
SAMPLERS = [
    [],
    ["--sampler", "fixed"],
    ["--sampler", "ddpm"],
    ["--sampler", "remask"],
    ["--sampler", "entropy_bound"],
    ["--sampler", "first_hitting"],
    ["--no-cache"],
    ["--sampler", "nope"],
]


def _command(data, verb: str, model_dir: Path) -> list[str]:
    table = SAMPLE_FLAGS if verb == "sample" else EVAL_FLAGS
    names = data.draw(st.lists(st.sampled_from(sorted(table)), max_size=4, unique=True))
    flags = {}
    for name in names:
        value = data.draw(st.one_of(table[name], st.text(max_size=6)) if data.draw(st.booleans()) else table[name])
        flags[name] = repr(value) if isinstance(value, float) else str(value)
    argv = [verb, str(model_dir)]
    argv += ["--prompt", "Hi", "--max-new-tokens", "8"] if verb == "sample" else ["--max-batches", "1"]
    argv += [f"{name}={value}" for name, value in flags.items()]  # `=`: a value may start with '-'
    return argv + (data.draw(st.sampled_from(SAMPLERS)) if verb == "sample" else [])


@settings(max_examples=60, **BOUNDED)
@given(st.data())
def test_sample_flags(model_dir, workdir, data):
    check_cli(_command(data, "sample", model_dir), workdir)


@settings(max_examples=40, **BOUNDED)
@given(st.data())
def test_eval_flags(model_dir, workdir, data):
    check_cli(_command(data, "eval", model_dir), workdir)


# -- crashes the search found before the generation and evaluation checks were fixed (kept as fixed cases) ----

FOUND = [
    ["sample", "--prompt", "Hi", "--max-new-tokens", "4", "--temperature", "nan"],
    ["sample", "--prompt", "Hi", "--max-new-tokens", "4", "--temperature", "inf"],
    ["sample", "--prompt", "Hi", "--max-new-tokens", "4", "--temperature", "1e39"],
    ["sample", "--prompt", "Hi", "--max-new-tokens", "4", "--temperature", "1e-40"],
    ["sample", "--prompt", "Hi", "--max-new-tokens", "4", "--top-p", "5e-324"],
    ["sample", "--prompt", "Hi", "--max-new-tokens", "100000000000000000000"],
    ["eval", "--max-batches", "1", "--block-length", "0"],
    ["eval", "--max-batches", "1", "--block-length", "-4"],
]


@pytest.mark.parametrize("argv", FOUND, ids=[" ".join(a[1:]) if a[0] == "eval" else " ".join(a[3:]) for a in FOUND])
def test_crashes_the_search_found_are_clear_errors_now(argv, model_dir, workdir):
    check_cli([argv[0], str(model_dir), *argv[1:]], workdir)
