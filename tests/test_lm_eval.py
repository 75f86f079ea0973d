"""The lm-evaluation-harness backend (``blockdiff/evaluation/lm_eval_backend.py``), run through lm-eval's real
evaluator on the local tasks of ``tests/lm_eval_tasks`` (no hub: the data is read from JSON lines next to the YAMLs).

At block length 1 the ``blockdiff`` model type must give lm-eval's own ``hf`` model type's numbers on the base decoder
(the block diffuser made from it, before any training, *is* that decoder: docs/design.md §7.1); at block length 4 the
Monte-Carlo ELBO must agree with the NELBO ``blockdiff eval`` computes on the same text.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from conftest import write_tiny_model_dir  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from test_finetune import save_base  # noqa: E402

from blockdiff.core.loss import block_diffusion_loss  # noqa: E402
from blockdiff.core.noise import make_schedule  # noqa: E402
from blockdiff.errors import UsageError  # noqa: E402
from blockdiff.evaluation.continuation import elbo_continuation_score, masked_elbo, windows  # noqa: E402
from blockdiff.evaluation.lm_eval_backend import BlockDiffusionLMEval  # noqa: E402
from blockdiff.evaluation.nelbo import evaluate_nelbo  # noqa: E402
from blockdiff.modeling.model import BlockDiffusionLM  # noqa: E402
from blockdiff.modeling.pretrained import load_pretrained  # noqa: E402
from blockdiff.modeling.spec import BlockDiffusionSpec  # noqa: E402

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(TASKS))


@pytest.fixture(scope="module")
def base_and_ar(tmp_path_factory):
    """A tiny random llama saved like a hub checkpoint, and the block diffuser made from it at L' = 1 (shift on)."""
    root = tmp_path_factory.mktemp("lm_eval_base")
    base = save_base(root / "base", "llama", vocab=None)
    backbone, tokenizer, _ = load_pretrained(str(base))
    model = BlockDiffusionLM(backbone.eval(), BlockDiffusionSpec(tokenizer.mask_token_id, 1, True, 32))
    model.save_pretrained(root / "bd")
    tokenizer.save_pretrained(root / "bd")
    return base, root / "bd"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("lm_eval_tiny"))  # L' = 4, byte tokenizer, context 32


def _evaluate(task_manager, model: str, args: dict, tasks: list[str], limit: int | None = 6):
    return lm_eval.simple_evaluate(
        model=model, model_args=args, tasks=tasks, task_manager=task_manager, limit=limit, log_samples=True,
        bootstrap_iters=0, device="cpu",
    )


def _resps(result, task: str) -> list:
    return [r for s in sorted(result["samples"][task], key=lambda s: s["doc_id"]) for r in s["resps"]]


def test_loglikelihood_at_block_length_1_is_the_hf_backends_exactly(base_and_ar, task_manager):
    base, bd = base_and_ar
    tasks = ["blockdiff_mc", "blockdiff_ppl"]
    ours = _evaluate(task_manager, "blockdiff", {"pretrained": str(bd), "add_bos_token": False, "max_length": 128,
                                                 "batch_size": 3}, tasks)
    theirs = _evaluate(task_manager, "hf", {"pretrained": str(base), "dtype": "float32", "max_length": 128}, tasks)
    mine, hf = _resps(ours, "blockdiff_mc"), _resps(theirs, "blockdiff_mc")
    assert len(mine) == len(hf) == 6 * 4  # 6 questions x 4 choices
    for (lp, greedy), (hf_lp, hf_greedy) in zip((r[0] for r in mine), (r[0] for r in hf)):
        assert lp == pytest.approx(float(hf_lp), abs=2e-4) and greedy == hf_greedy
    assert ours["results"]["blockdiff_mc"]["acc,none"] == theirs["results"]["blockdiff_mc"]["acc,none"]
    rolled, hf_rolled = _resps(ours, "blockdiff_ppl"), _resps(theirs, "blockdiff_ppl")
    assert len(rolled) == 6
    for (a,), (b,) in zip(rolled, hf_rolled):  # passages of ~400 byte tokens: several windows of 128
        assert float(a) == pytest.approx(float(b), rel=1e-5)
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["blockdiff_ppl"][key] == pytest.approx(theirs["results"]["blockdiff_ppl"][key], rel=1e-5)


def test_the_elbo_of_every_token_fully_masked_is_the_training_nelbo_at_t_1(tiny_dir):
    lm = BlockDiffusionLMEval(str(tiny_dir))
    model = lm.model
    x0 = torch.randint(0, model.mask_token_id, (2, 32), generator=torch.Generator().manual_seed(0))
    every = torch.ones_like(x0, dtype=torch.bool)  # no shift: position 0 is predicted too
    nats, _ = masked_elbo(model, x0, every, torch.ones(x0.shape), 4)
    loss = block_diffusion_loss(model, x0, make_schedule("loglinear"), (1.0, 1.0), t=torch.ones(2, 8))
    torch.testing.assert_close(nats.sum(), loss.nll_sum, rtol=1e-5, atol=1e-4)


def test_the_monte_carlo_elbo_agrees_with_blockdiff_evals_nelbo_on_the_same_text(tiny_dir):
    """One 32-token window: the ELBO of blocks 1..7 given block 0 against the per-block NELBO the training loss (and
    so `blockdiff eval`) computes for the same blocks. A noisy block only sees the clean blocks before it, so both are
    the same estimator; the two seeded estimates must agree within 4 standard errors."""
    lm = BlockDiffusionLMEval(str(tiny_dir))
    model, schedule = lm.model, make_schedule("loglinear")
    ids = lm.tok_encode("The quick brown fox jumps over the lazy dog. A cat sat")[:32]
    samples = 512
    ours = elbo_continuation_score(model, ids[:4], ids[4:], schedule, (1e-3, 1.0), samples,
                                   torch.Generator().manual_seed(1))
    batch = torch.tensor([ids] * 64)
    generator, theirs = torch.Generator().manual_seed(2), []
    for _ in range(samples // 64):
        out = block_diffusion_loss(model, batch, schedule, (1e-3, 1.0), True, generator, reduction="block")
        theirs.append(out.per_block[:, 1:].sum(-1) * 4)  # (64,) nats of blocks 1..7 per row
    theirs = torch.cat(theirs)
    se = math.hypot(ours.stderr, float(theirs.std() / math.sqrt(len(theirs))))
    assert abs(-ours.logprob - float(theirs.mean())) < 4 * se
    assert ours.stderr > 0 and not ours.exact and ours.num_tokens == 28
    full = evaluate_nelbo(model, [batch], schedule, (1e-3, 1.0), 1.0, seed=3)  # what `blockdiff eval` averages
    assert full.nll * 32 == pytest.approx(float(theirs.mean()) * 32 / 28, rel=0.25)


def test_windows_cover_every_continuation_token_once_with_the_most_context():
    assert windows([1, 2], [3], 8) == [([1, 2], [3])]
    assert windows(list(range(10)), [10, 11], 8) == [(list(range(4, 10)), [10, 11])]  # context cut from the left
    pieces = windows([0], list(range(1, 20)), 8)  # a continuation longer than the window: chunks of 4
    assert [t for _, x in pieces for t in x] == list(range(1, 20))
    assert all(len(c) + len(x) <= 8 and c and c[-1] + 1 == x[0] for c, x in pieces)
    with pytest.raises(UsageError, match="at least one context token"):
        windows([], [1], 8)


def test_long_contexts_and_empty_continuations(tiny_dir):
    lm = BlockDiffusionLMEval(str(tiny_dir), mc_samples=4)
    long_context = lm.tok_encode("a" * 100)  # past the 32-token window: cut from the left
    (cut,) = lm.score_pairs([(long_context, lm.tok_encode(" dog"))])
    (same,) = lm.score_pairs([(long_context[-28:], lm.tok_encode(" dog"))])
    assert cut.logprob == same.logprob and cut.num_tokens == 4
    (empty,) = lm.score_pairs([(long_context, [])])
    assert (empty.logprob, empty.is_greedy, empty.num_tokens) == (0.0, True, 0)
    (longer,) = lm.score_pairs([([lm.prefix_token_id], lm.tok_encode("b" * 80))])  # 80 tokens: three chunks
    assert longer.num_tokens == 80 and math.isfinite(longer.logprob) and longer.logprob < 0


def test_generate_until_honours_until_and_max_gen_toks_and_batching(tiny_dir, task_manager):
    from lm_eval.api.instance import Instance

    def requests(gen_kwargs):
        return [Instance("generate_until", {}, (p, gen_kwargs), i) for i, p in enumerate(["The cat", "A dog", "Ab"])]

    one = BlockDiffusionLMEval(str(tiny_dir), batch_size=1, temperature=1.0, do_sample=True)
    three = BlockDiffusionLMEval(str(tiny_dir), batch_size=3, temperature=1.0, do_sample=True)
    never = {"until": ["\x00never\x00"], "max_gen_toks": 9, "do_sample": True, "temperature": 1.0}
    texts = one.generate_until(requests(never))
    assert texts == three.generate_until(requests(never))  # request i: seed + i, whatever its batch
    assert all(len(t) <= 9 for t in texts) and max(len(t) for t in texts) == 9  # a byte token is one character
    # (a stop string that never occurs: the text runs to max_gen_toks)
    stop = texts[0][2:4]  # a string that does occur: the text is cut before it
    cut = one.generate_until(requests({**never, "until": [stop]}))[0]
    assert stop not in cut and texts[0].startswith(cut)
    result = _evaluate(task_manager, "blockdiff", {"pretrained": str(tiny_dir), "batch_size": 2}, ["blockdiff_gen"], 4)
    outs = [r[0] for r in _resps(result, "blockdiff_gen")]
    assert len(outs) == 4 and all(isinstance(o, str) and "\n" not in o for o in outs)
    assert "exact_match,none" in result["results"]["blockdiff_gen"]


def test_bad_model_args_are_refused_by_name(tiny_dir):
    with pytest.raises(UsageError, match="unknown generation setting"):
        BlockDiffusionLMEval(str(tiny_dir), no_such_setting=1)
    with pytest.raises(UsageError, match="tau"):
        BlockDiffusionLMEval(str(tiny_dir), tau=3.0)
    with pytest.raises(UsageError, match="mc_samples"):
        BlockDiffusionLMEval(str(tiny_dir), mc_samples=0)


def test_lm_evals_own_command_line_runs_the_blockdiff_model(tiny_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "blockdiff.evaluation.lm_eval_backend", "run", "--model", "blockdiff",
         "--model_args", f"pretrained={tiny_dir},mc_samples=2", "--tasks", "blockdiff_mc",
         "--include_path", str(TASKS), "--limit", "2", "--device", "cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "blockdiff_mc" in proc.stdout and "acc" in proc.stdout


@pytest.mark.parametrize("model_args, says", [
    ("mc_samples=2", "model_args pretrained=RUN_OR_MODEL_DIR"),
    ("pretrained={missing}", "does not exist"),
    ("pretrained={tiny},max_length=1", "max_length must be an integer >= 2"),
], ids=["no-pretrained", "missing-path", "max-length-1"])
def test_lm_eval_command_line_prints_bad_model_args_as_one_line(tiny_dir, tmp_path, capsys, monkeypatch, model_args,
                                                                says):
    # issue 20 item 10: these were tracebacks of blockdiff's own error classes (and a TypeError for no pretrained)
    from blockdiff.evaluation.lm_eval_backend import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr("lm_eval.__main__.setup_logging", lambda: None)  # its handlers would outlive capsys's stream
    args = model_args.format(tiny=tiny_dir, missing=tmp_path / "nothing-here")
    with pytest.raises(SystemExit) as info:
        main(["run", "--model", "blockdiff", "--model_args", args, "--tasks", "blockdiff_mc", "--include_path",
              str(TASKS), "--limit", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith("error: ") and says in err[-1], err
    assert not any("Traceback" in line for line in err), err
