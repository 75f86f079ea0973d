"""The log-likelihood of a continuation given its context under a block diffuser, defined once.

* Block length 1 (``L' = 1``): the exact autoregressive log-likelihood. Every position is masked (``t = 1``) and
  read through ``scoring.block_diffusion_ar_logits``, so this is the decoder's causal forward (docs/design.md §7.1);
  ``is_greedy`` is the usual "every token is the argmax given the tokens before it".
* ``L' > 1``: a Monte-Carlo estimate of the block-diffusion ELBO of the continuation, a *lower bound* on
  ``log p(continuation | context)``. Context and continuation sit on the training grid (block ``k`` = positions
  ``[k L', (k+1) L')``); the context's tokens are always clean, including those sharing a block with the
  continuation (as a prompt tail is during generation), and positions past the end of the last block are masks
  (noise, as in generation). Each sample draws one ``t ~ U[eps, 1]`` per block (stratified across samples),
  masks every continuation token of that block with probability ``1 - alpha(t)`` and sums the weighted
  ``-log p`` of the masked ones, exactly the training NELBO restricted to the continuation. The estimate is the
  mean over ``samples`` draws (LLaDA's ``get_log_likelihood`` practice); ``stderr`` is its standard error.
  ``is_greedy`` is defined as one-shot greedy: with every continuation position masked, the argmax at each one is
  the continuation's token (a stricter test than step-by-step greedy decoding passes).

``windows`` cuts a pair that does not fit the model's context into pieces that do (every continuation token scored
once, with as much left context as fits). The lm-eval backend (``lm_eval_backend.py``) and anything else that
scores continuations use these. No Lightning.

Shape legend: ``s`` samples, ``n`` tokens (padded to whole blocks), ``k`` blocks, ``m`` masked rows, ``v`` vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from blockdiff.core.loss import masked_nelbo
from blockdiff.core.noise import sample_t
from blockdiff.errors import UsageError
from blockdiff.evaluation.scoring import block_diffusion_ar_logits

__all__ = ["ContinuationScore", "windows", "ar_continuation_scores", "elbo_continuation_score", "masked_elbo"]


@dataclass
class ContinuationScore:
    logprob: float  # log p(continuation | context): exact at L' = 1, else the ELBO estimate (a lower bound)
    is_greedy: bool
    num_tokens: int  # continuation tokens scored
    exact: bool  # True at L' = 1
    stderr: float = 0.0  # standard error of the Monte-Carlo estimate (0 when exact)


def windows(context: list[int], continuation: list[int], max_length: int) -> list[tuple[list[int], list[int]]]:
    """``(context, continuation)`` pieces of at most ``max_length`` tokens each, covering every continuation token once.

    A pair that fits is returned whole. Otherwise the context is cut from the left to what fits; a continuation of
    ``max_length`` tokens or more is scored in chunks of ``max_length // 2`` tokens, each after the
    ``max_length - chunk`` tokens before it. ``context`` must hold at least one token (BOS or the prefix token)."""
    if not context:
        raise UsageError("a continuation is scored after at least one context token (BOS or the prefix token)")
    if max_length < 2:
        raise UsageError(f"max_length must be at least 2 tokens, got {max_length}")
    if len(context) + len(continuation) <= max_length:
        return [(list(context), list(continuation))]
    if len(continuation) < max_length:
        return [(list(context[len(context) + len(continuation) - max_length :]), list(continuation))]
    seq, chunk, out = list(context) + list(continuation), max_length // 2, []
    for start in range(len(context), len(seq), chunk):
        end = min(start + chunk, len(seq))
        out.append((seq[max(0, start - (max_length - (end - start))) : start], seq[start:end]))
    return out


def _padded(rows: list[list[int]], fill: int, multiple: int, device) -> torch.Tensor:
    width = -(-max(len(r) for r in rows) // multiple) * multiple
    out = torch.full((len(rows), width), fill, dtype=torch.long)  # (b, n)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


@torch.no_grad()
def ar_continuation_scores(model, pairs: list[tuple[list[int], list[int]]]) -> list[ContinuationScore]:
    """Exact AR scores of a batch of pairs with the model at block length 1.

    Under the logit shift the prediction of token ``i`` is the clean stream's output at ``i - 1``, i.e. the decoder's
    causal forward (docs/design.md §7.1), so the decoder runs on the tokens before the last (mask token suppressed) and
    a pair may be one token longer than the positions it uses. Without the shift the prediction of token ``i`` is a
    mask row at position ``i`` (``scoring.block_diffusion_ar_logits``)."""
    seqs = [c + x for c, x in pairs]
    ids = _padded(seqs, 0, 1, model.device)  # (b, n): right padding, never seen by earlier positions
    if model.spec.logit_shift:
        logits = model.backbone(input_ids=ids[:, :-1], use_cache=False).logits.float()  # (b, n-1, v)
        logits[..., model.mask_token_id] = float("-inf")
    else:
        logits = block_diffusion_ar_logits(model)(ids)  # (b, n-1, v)
    logp = logits.log_softmax(-1)  # row i predicts token i + 1
    out = []
    for i, (context, cont) in enumerate(pairs):
        if not cont:
            out.append(ContinuationScore(0.0, True, 0, True))
            continue
        rows = logp[i, len(context) - 1 : len(context) - 1 + len(cont)]  # (c, v)
        target = torch.tensor(cont, device=rows.device)
        picked = rows.gather(-1, target[:, None])[:, 0]
        out.append(ContinuationScore(float(picked.sum()), bool((rows.argmax(-1) == target).all()), len(cont), True))
    return out


def masked_elbo(model, x0: torch.Tensor, masked: torch.Tensor, weight: torch.Tensor, block_length: int):
    """``(per-row weighted nats (s,), argmax (s, n))``: the training forward on ``x_t = x0`` with ``masked`` positions
    replaced by the mask token; nats (``core.loss.masked_nelbo``) are summed over the masked positions only (argmax is
    -1 elsewhere)."""
    xt = x0.masked_fill(masked, model.mask_token_id)  # (s, n)
    hidden = model.training_hidden(xt, x0, block_length)  # (s, n, d)
    logits = model.logits(hidden[masked])  # (m, v)
    per_token = masked_nelbo(logits, x0, masked, weight)  # (s, n)
    argmax = torch.full(x0.shape, -1, dtype=torch.long, device=x0.device)
    argmax[masked] = logits.argmax(-1)
    return per_token.sum(-1), argmax


@torch.no_grad()
def elbo_continuation_score(
    model, context: list[int], continuation: list[int], schedule, t_range: tuple[float, float], samples: int,
    generator: torch.Generator | None = None, chunk: int = 16,
) -> ContinuationScore:
    """The Monte-Carlo ELBO of ``continuation`` after ``context`` at the model's block length (module docstring)."""
    if not continuation:
        return ContinuationScore(0.0, True, 0, False)
    if samples < 1:
        raise UsageError(f"the number of Monte-Carlo samples must be >= 1, got {samples}")
    l, device = model.block_length, model.device
    n = len(context) + len(continuation)
    x0 = _padded([context + continuation], 0, l, device)  # (1, n): pad sits in the last block, never a key
    cont = torch.zeros_like(x0, dtype=torch.bool)
    cont[0, len(context) : n] = True
    pad = torch.zeros_like(cont)
    pad[0, n:] = True  # always masked: the unknown rest of the last block
    blocks = x0.shape[1] // l
    t = sample_t((samples, blocks), *t_range, antithetic=True, generator=generator, device=device)  # (s, k)
    t_tok = t.repeat_interleave(l, dim=1)  # (s, n)
    draw = torch.rand(t_tok.shape, generator=generator, device=device) < 1.0 - schedule.alpha(t_tok)
    masked = (draw & cont) | pad  # (s, n)
    weight = schedule.loss_weight(t_tok) * cont  # pad rows are masked inputs, never scored
    totals = []
    for start in range(0, samples, chunk):
        part = slice(start, start + chunk)
        rows = masked[part].shape[0]
        nats, _ = masked_elbo(model, x0.expand(rows, -1), masked[part], weight[part], l)
        totals.append(nats)
    nats = torch.cat(totals)  # (s,)
    _, greedy = masked_elbo(model, x0, cont | pad, cont.float(), l)  # every continuation position masked
    is_greedy = bool((greedy[cont] == x0[cont]).all())
    stderr = float(nats.std(unbiased=True) / math.sqrt(samples)) if samples > 1 else float("nan")
    return ContinuationScore(-float(nats.mean()), is_greedy, len(continuation), False, stderr)
