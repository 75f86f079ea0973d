"""A greedy 2-branch draft tree: two chains of drafts checked by ONE verifier forward (docs/design.md §14,
docs/generation.md "Speculative decoding"; the ``hybrid`` drafter's ``hybrid_tree`` knob).

When lookup and the DFlash drafter both propose, and disagree at their first token, one forward checks both:

```
cache  = the verifier's KV of committed[:-1]                                 (c = committed, n = len(c))
fed    = [committed tokens not cached (u of them) ; A = a_0 .. a_{ka-1} ; B = b_0 .. b_{kb-1}]
pos    = [n-u .. n-1 ; n .. n+ka-1 ; n .. n+kb-1]            B restarts where A does: both follow c_{n-1}
mask   = committed rows causal; A rows see the cache, the fed committed tokens and A causally;
         B rows see the cache, the fed committed tokens and B causally, never A
logits = [row after c_{n-1} (shared) ; A's ka rows ; B's kb rows]  -> each branch's (k + 1, v) chain rows
greedy: each branch's accepted prefix (accept_greedy); the longer wins (ties: A); it commits as a chain would
cache  : the winner's entries moved right after the committed ones, the loser's dropped (then cropped as always)
states : the verifier's fed-token features laid out as the winner's chain forward would have left them
```

Each branch's rows and cache entries are what a chain forward of that branch alone computes (its tokens see exactly
what they would see there; tested in fp64), so after ``keep_branch`` the verifier holds exactly ``committed[:-1]``
and the DFlash drafter absorbs the accepted drafts' states in order: the output is the verifier's greedy output.

Greedy only. Under sampling two branches need recursive rejection sampling over the drafts (SpecInfer, Miao et al.
2024) to keep the verifier's distribution; the hybrid drafter then checks one chain, as without the tree. The tree
also needs attention that applies a custom 4-D mask (``takes_tree_masks``: SDPA or eager attention that a probe sees
apply it) and a plain ``DynamicCache`` (no sliding-window layers): otherwise the chain is used.

Shape legend: ``u`` uncached committed tokens fed, ``ka`` / ``kb`` drafts of branch A / B, ``q = u + ka + kb`` fed
tokens, ``s`` key tokens (cached + fed), ``v`` the verifier's vocabulary, ``F`` feature width.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from transformers import cache_utils

from blockdiff.sampling.speculative.verify import CausalLMVerifier, accept_greedy

__all__ = ["TreeStep", "takes_tree_masks", "plain_cache", "tree_mask", "score_tree", "choose_branch", "keep_branch"]

_PROBED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (attention implementation, verdict)


@dataclass
class TreeStep:
    """One tree forward's result: each branch's tokens and chain rows, which won and where its entries lie."""

    drafts: tuple[torch.Tensor, torch.Tensor]  # (ka,), (kb,)
    logits: tuple[torch.Tensor, torch.Tensor]  # (ka + 1, v), (kb + 1, v): each branch's rows, row 0 shared
    fed_committed: int  # u: committed tokens fed before the branches
    winner: int = 0  # 0: A (lookup), 1: B (dflash)
    accepted: int = 0  # the winner's accepted drafts


def takes_tree_masks(model) -> bool:
    """Whether ``model``'s attention applies a custom 4-D mask (SDPA or eager, and a probe like
    ``modeling.pretrained.check_custom_masks``: position 0's state differs under a causal and a full mask). Probed
    once per model and attention implementation."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return False
    seen = _PROBED.get(model)
    if seen is not None and seen[0] == impl:
        return seen[1]
    device, dtype = model.device, model.dtype
    ids = (torch.arange(1, 5, device=device) % model.get_input_embeddings().num_embeddings)[None]  # (1, 4)
    causal = torch.ones(4, 4, dtype=torch.bool, device=device).tril()
    outs = []
    try:
        with torch.no_grad():
            for allowed in (causal, torch.ones_like(causal)):
                out = model.base_model(input_ids=ids, position_ids=torch.arange(4, device=device)[None],
                                       attention_mask=_format(allowed[None, None], impl, dtype), use_cache=False)
                outs.append(out.last_hidden_state[0, 0])
        verdict = not torch.allclose(outs[0], outs[1])
    except Exception:  # noqa: BLE001 - any failure here means "cannot take a 4-D mask": use the chain
        verdict = False
    _PROBED[model] = (impl, verdict)
    return verdict


def tree_mask(cached: int, fed_committed: int, ka: int, kb: int) -> torch.Tensor:
    """``(q, s)`` boolean "may attend" mask of the tree forward (module docstring): every row sees the ``cached``
    keys; among the fed tokens a row sees the earlier (and its own) committed tokens and its own branch, causally."""
    q = fed_committed + ka + kb
    branch = torch.tensor([0] * fed_committed + [1] * ka + [2] * kb)  # (q,) 0: committed, 1: A, 2: B
    causal = torch.ones(q, q, dtype=torch.bool).tril()  # (q, q) in fed order: B comes after A
    same = (branch[None, :] == 0) | (branch[None, :] == branch[:, None])  # key committed, or the query's branch
    return torch.cat([torch.ones(q, cached, dtype=torch.bool), causal & same], dim=1)  # (q, s)


def _format(allowed: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> what the attention takes: SDPA a boolean, eager an additive float mask."""
    if impl != "eager":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def plain_cache(verifier: CausalLMVerifier) -> bool:
    """Whether every layer of the verifier's cache is a plain ``DynamicLayer`` (entries can be moved freely; a
    transformers without per-layer cache objects: no)."""
    plain, layers = getattr(cache_utils, "DynamicLayer", None), getattr(verifier.cache, "layers", None)
    return plain is not None and layers is not None and all(type(layer) is plain for layer in layers)


@torch.no_grad()
def score_tree(verifier: CausalLMVerifier, committed: list[int], a: torch.Tensor, b: torch.Tensor) -> TreeStep:
    """One verifier forward over [uncached committed tokens ; ``a`` (ka,) ; ``b`` (kb,)] under ``tree_mask``; each
    branch's chain rows ``(k + 1, v)``, as ``verifier.score(committed, branch)`` would give them."""
    model = verifier.model
    device = model.device
    start = verifier.cache.get_seq_length()  # == len(committed) - 1 after a commit
    n, ka, kb = len(committed), len(a), len(b)
    u = n - start
    fed = torch.cat([torch.tensor(committed[start:], dtype=torch.long), a.cpu().long(), b.cpu().long()])  # (q,)
    positions = torch.cat([torch.arange(start, n + ka), torch.arange(n, n + kb)])  # (q,)
    allowed = tree_mask(start, u, ka, kb).to(device)  # (q, s)
    mask = _format(allowed[None, None], model.config._attn_implementation, model.dtype)
    logits = verifier.forward(fed.to(device), positions.to(device), ka + kb + 1, attention_mask=mask)  # (ka+kb+1, v)
    return TreeStep((a, b), (logits[: ka + 1], torch.cat([logits[:1], logits[ka + 1 :]])), u)


def choose_branch(step: TreeStep, fit) -> TreeStep:
    """Greedy acceptance on each branch's rows (``fit``: ``Sampling.fit``, as the loop reads them); the branch with
    more accepted drafts wins, A on a tie."""
    kept = [accept_greedy(fit(rows), drafts)[0] for rows, drafts in zip(step.logits, step.drafts)]
    step.winner = int(kept[1] > kept[0])
    step.accepted = kept[step.winner]
    return step


def keep_branch(verifier: CausalLMVerifier, step: TreeStep) -> None:
    """Leave the verifier as a chain forward of the winning branch alone would have: its cache entries follow the
    committed ones (the loser's are dropped; ``verifier.commit`` then crops the rejected tail) and its kept
    features (``features``, rows from ``fed_start``) are the committed tokens' then the winner's."""
    ka, kb = (len(d) for d in step.drafts)
    first = verifier.fed_start + step.fed_committed  # cache index of the first draft (== len(committed))
    if step.winner == 0:
        keep = torch.arange(first + ka)
    else:
        keep = torch.cat([torch.arange(first), torch.arange(first + ka, first + ka + kb)])
    for layer in verifier.cache.layers:
        if layer.get_seq_length() > 0:
            index = keep.to(layer.keys.device)
            layer.keys = layer.keys.index_select(-2, index)  # (b, heads, len(keep), head_dim)
            layer.values = layer.values.index_select(-2, index)
    if verifier.features is not None:  # (q, F) rows of the fed tokens -> the winner's chain rows
        verifier.features = verifier.features[(keep[verifier.fed_start :] - verifier.fed_start).to(
            verifier.features.device)]
