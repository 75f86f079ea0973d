"""Evaluation against an autoregressive reference: exact AR perplexity and generative perplexity.

* ``ar_perplexity`` — the base decoder's *exact* perplexity on the same held-out windows the NELBO bound
  is computed on (token 0 of each window is not predicted by either, so both average over the same
  tokens). A block diffuser's bound can then be read against the model it started from.
* ``generative_eval`` — samples from held-out prompts, scored by a frozen judge decoder (default: the base
  model itself): generative perplexity of the continuation given the prompt, the mean unigram entropy of
  each sample (low entropy exposes repetitive text that a judge scores too kindly), and tokens/s.
  ``base_generative_eval`` runs the same protocol with the base model's own ``generate()``.

Scoring is ``scoring.py``'s and the generate-one-prompt-at-a-time loop ``generative.py``'s: this module only
tokenises for the judge and puts the numbers together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from blockdiff.errors import UsageError
from blockdiff.evaluation.generative import Generations, generate_each, sample_each
from blockdiff.evaluation.scoring import causal_lm_logits, continuation_nll, scored_nll, unigram_entropy

__all__ = [
    "Judge", "load_judge", "ar_perplexity", "judge_nll", "GenerativeResult", "generative_eval",
    "base_generative_eval", "Comparison", "compare_with_base",
]


@dataclass
class Judge:
    model: torch.nn.Module  # a plain Hugging Face causal LM, eval mode
    tokenizer: object
    name: str


def load_judge(name: str, trust_remote_code: bool = False, device: str | torch.device | None = None) -> Judge:
    """A frozen decoder as it was published: no tokens added, no masks checked."""
    from blockdiff.modeling.pretrained import load_decoder

    model, tokenizer, _ = load_decoder(name, trust_remote_code, what="--base/--judge")
    if device is not None:
        model = model.to(device)
    return Judge(model.eval().requires_grad_(False), tokenizer, name)


@torch.no_grad()
def ar_perplexity(model, batches, max_batches: int | None = None) -> tuple[float, int]:
    """``(nats/token, tokens)``: exact next-token NLL of a causal LM on ``(b, n)`` windows, tokens ``1..n-1``."""
    nll_sum, count = 0.0, 0
    vocab = model.get_output_embeddings().weight.shape[0]
    scorer = causal_lm_logits(model)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        batch = batch.to(model.device)
        if int(batch.max()) >= vocab:
            raise UsageError(f"the held-out text has token id {int(batch.max())} outside the base model's {vocab} rows")
        nll_sum += scored_nll(scorer, batch, 1).item()
        count += batch[:, 1:].numel()
    return nll_sum / max(count, 1), count


@torch.no_grad()
def judge_nll(judge: Judge, prompts: list[str], continuations: list[str]) -> tuple[float, int]:
    """``(nats/token, tokens)`` of each continuation given its prompt under the judge (its own tokenizer)."""
    tok = judge.tokenizer
    scorer = causal_lm_logits(judge.model)
    nll_sum, count = 0.0, 0
    for prompt, text in zip(prompts, continuations):
        head = tok(prompt, add_special_tokens=False)["input_ids"]
        tail = tok(text, add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None:
            head = [tok.bos_token_id, *head]
        nll, n = continuation_nll(scorer, head, tail, device=judge.model.device)
        nll_sum += nll
        count += n
    return nll_sum / max(count, 1), count


@dataclass
class GenerativeResult:
    label: str  # e.g. "threshold tau=0.9"
    gen_ppl: float  # judge perplexity of the continuations
    entropy: float  # mean unigram entropy per sample (nats)
    nfe_per_token: float  # network calls per generated token (1.0 for AR)
    tokens_per_second: float
    samples: list[str]


def _result(label: str, judge: Judge, gens: Generations) -> GenerativeResult:
    nll, _ = judge_nll(judge, gens.prompts, gens.texts)
    return GenerativeResult(
        label, math.exp(nll), sum(unigram_entropy(t) for t in gens.tokens) / len(gens.tokens),
        sum(gens.nfes) / max(gens.produced, 1), gens.produced / gens.seconds, gens.texts,
    )


def generative_eval(
    model, tokenizer, prompts: list[str], judge: Judge, label: str, seed: int = 0, **settings
) -> GenerativeResult:
    """Continue ``prompts`` with the block diffuser (``settings`` are generation overrides) and judge them."""
    return _result(label, judge, sample_each(model, tokenizer, prompts, seed, **settings))  # batch 1, like below


@torch.no_grad()
def base_generative_eval(
    judge: Judge,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    seed: int = 0,
    label: str = "base AR generate()",
) -> GenerativeResult:
    """The same protocol with the base decoder's own ``generate()`` (one prompt at a time, KV cache on)."""
    tok = judge.tokenizer

    def one(i: int, prompt: str) -> tuple[str, list[int], int]:
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor(
            [[tok.bos_token_id, *ids] if tok.bos_token_id is not None else ids], device=judge.model.device
        )
        torch.manual_seed(seed + i)
        out = judge.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature or None,
            top_k=None,
            top_p=None,
            pad_token_id=tok.eos_token_id,
        )
        new = out[0, ids.shape[1] :].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        return tok.decode(new, skip_special_tokens=True), new, len(new)  # one forward per token

    return _result(label, judge, generate_each(prompts, one))


@dataclass
class Comparison:
    nelbo: object  # evaluate.EvalResult of the block diffuser
    base_name: str
    base_nll: float  # exact AR nats/token of the base decoder on the same tokens
    base_tokens: int
    generative: list[GenerativeResult]
    prompts: list[str]  # the held-out prompts the samples continue

    @property
    def base_ppl(self) -> float:
        return math.exp(self.base_nll)

    @property
    def bound_ratio(self) -> float:
        """NELBO-perplexity bound / base AR perplexity (1.0 = the bound reaches the base model)."""
        return self.nelbo.ppl / self.base_ppl


def compare_with_base(
    path,
    overrides: list[str] = (),
    base: str | None = None,
    judge: str | None = None,
    samplers: list[str] = ("threshold", "first_hitting"),
    num_samples: int = 8,
    prompt_tokens: int = 16,
    gen_length: int = 64,
    temperature: float = 0.8,
    max_batches: int | None = None,
    seed: int = 0,
    block_length: int | None = None,
    device: str | None = None,
) -> Comparison:
    """NELBO bound (at ``block_length``, default the model's) vs the base model's exact AR perplexity on the same
    tokens, then judged samples (``num_samples=0`` skips them)."""
    from blockdiff.evaluation.nelbo import evaluate_held_out
    from blockdiff.modeling.io import load_model_dir

    loaded = load_model_dir(path, overrides, device)
    cfg = loaded.config
    base = base or cfg.model.pretrained
    if base is None:
        raise UsageError(f"{path} was not fine-tuned from a pretrained decoder; name the reference with --base NAME")
    nelbo, corpus, loader = evaluate_held_out(loaded, max_batches, seed, block_length)
    reference = load_judge(base, cfg.model.trust_remote_code, loaded.model.device)
    base_nll, base_tokens = ar_perplexity(reference.model, loader, max_batches)
    judge_model = reference if judge in (None, base) else load_judge(judge, device=loaded.model.device)
    results, prompts = [], []
    if num_samples > 0:
        rows = corpus.val[:num_samples]["input_ids"]
        prompts = [loaded.tokenizer.decode(r[1 : 1 + prompt_tokens], skip_special_tokens=True) for r in rows]
        common = {"max_new_tokens": gen_length, "temperature": temperature}
        for sampler in samplers:
            label = f"{sampler} tau={loaded.model.generation_config.tau}" if sampler == "threshold" else sampler
            results.append(
                generative_eval(
                    loaded.model, loaded.tokenizer, prompts, judge_model, label, seed, sampler=sampler, **common
                )
            )
        results.append(base_generative_eval(reference, prompts, gen_length, temperature, seed))
    return Comparison(nelbo, base, base_nll, base_tokens, results, prompts)
