"""The ``blockdiff`` model type of lm-evaluation-harness (``pip install 'blockdiff[eval]'``).

Importing this module registers ``blockdiff`` with lm-eval's model registry (``lm_eval.api.registry``), so it works
with ``lm_eval.simple_evaluate(model="blockdiff", model_args={"pretrained": RUN_OR_MODEL_DIR, ...})`` and with
lm-eval's own command line through this module, which registers the model and then hands over to ``lm-eval``
(lm-eval 0.4 has no plugin entry point for models)::

    python -m blockdiff.evaluation.lm_eval_backend run --model blockdiff \\
        --model_args pretrained=runs/bl8,mc_samples=64 --tasks TASK --include_path DIR

What each request type computes (``continuation.py`` holds the math):

* ``loglikelihood``: exact AR log-likelihood at block length 1; otherwise the Monte-Carlo block-diffusion ELBO of
  the continuation given the context with ``mc_samples`` samples (a lower bound; ``is_greedy`` is one-shot greedy).
  A pair longer than ``max_length`` (default: the training context) is cut by ``continuation.windows``: the context
  from the left, a continuation of ``max_length`` tokens or more into chunks scored one after another.
  An empty continuation scores ``0.0`` and is greedy.
* ``loglikelihood_rolling``: the sum over lm-eval's disjoint rolling windows of ``max_length`` tokens (each token
  scored once, given the token before its window), so at block length 1 it is the exact AR log-likelihood of the
  document and otherwise the NELBO bound, windowed like ``blockdiff eval`` (which packs ``max_length``-token windows).
* ``generate_until``: block generation with the model's sampler defaults, the sampler settings given as model args
  (``sampler``, ``tau``, ``steps_per_block``, any sampler knob) and the request's ``temperature`` / ``do_sample``
  (lm-eval's default is greedy). It stops at EOS, at ``max_gen_toks`` or after an ``until`` string, which is cut off
  the returned text (a string that never occurs: the text runs to ``max_gen_toks``). Requests with equal settings
  are generated ``batch_size`` at a time, request ``i`` with seed ``seed + i``. A context that would not fit the
  window with one block to spare keeps its last tokens.

Contexts start with BOS when the tokenizer has one (``add_bos_token=True``, how blockdiff models are trained);
``add_bos_token=False`` gives lm-eval's own convention (the prefix token only for an empty context).
"""

from __future__ import annotations

import sys

import torch

from blockdiff.errors import MissingPackageError, UsageError
from blockdiff.evaluation.continuation import (
    ContinuationScore,
    ar_continuation_scores,
    elbo_continuation_score,
    windows,
)

try:
    import lm_eval.models  # noqa: F401 - lm-eval's own models are registered before ours (its lookup needs both)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise MissingPackageError(
        f"the lm-eval backend needs lm-evaluation-harness ({err}): pip install 'blockdiff[eval]' (or lm-eval)"
    ) from None

__all__ = ["BlockDiffusionLMEval"]

@register_model("blockdiff")
class BlockDiffusionLMEval(TemplateLM):
    """A blockdiff run or model directory as an lm-eval ``LM`` (module docstring)."""

    def __init__(
        self,
        pretrained: str | None = None,
        device: str | None = "cpu",
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        block_length: int | None = None,
        mc_samples: int = 32,
        seed: int = 0,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool = True,
        **generation,
    ):
        super().__init__()
        from blockdiff.core.noise import make_schedule
        from blockdiff.modeling.io import load_model_dir
        from blockdiff.sampling.inputs import with_overrides
        from blockdiff.sampling.resolve import resolve

        if not pretrained:
            raise UsageError("say which model to evaluate: model_args pretrained=RUN_OR_MODEL_DIR")
        loaded = load_model_dir(pretrained, device=device or "cpu")
        self.model = loaded.model if block_length is None else loaded.model.with_block_length(int(block_length))
        self.tokenizer = loaded.tokenizer
        self.schedule = make_schedule(self.model.spec.schedule)
        self.t_range = loaded.config.noise.eval_range
        self.batch_size_per_gpu = _positive_int("batch_size", 1 if batch_size in (None, "auto") else batch_size)
        self.mc_samples = _positive_int("mc_samples", mc_samples)
        self.seed = int(seed)
        self.add_bos_token = bool(add_bos_token)
        self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self._max_length = max_length or self.model.spec.max_seq_len or self.model.max_positions
        if self._max_length is None:
            raise UsageError("say how long a scored window may be: model_args max_length=N (N >= 2)")
        if isinstance(self._max_length, bool) or not str(self._max_length).isdigit() or int(self._max_length) < 2:
            raise UsageError(
                f"model_args max_length must be an integer >= 2 (a scored window holds a context token and the token "
                f"it predicts), got {max_length!r}"
            )
        l = self.model.block_length
        self._max_length = int(self._max_length) if l == 1 else int(self._max_length) // l * l  # whole blocks
        if self._max_length < 2:
            raise UsageError(f"model_args max_length={max_length} holds no two whole blocks of {l} tokens")
        self.generation_config = with_overrides(self.model.generation_config, generation)  # unknown keys: refused
        self.generation = resolve(self.model, self.generation_config, context=self._max_length)  # checked
        self._device = self.model.device

    # -- what lm-eval reads -----------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "blockdiff").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise UsageError("this model's tokenizer has no chat template; run lm-eval without --apply_chat_template")
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # -- loglikelihood ----------------------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        context_enc, continuation_enc = super()._encode_pair(context, continuation)
        return self._with_bos(context_enc), continuation_enc

    def _with_bos(self, ids: list[int]) -> list[int]:
        bos = self.tokenizer.bos_token_id
        if self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            return [bos, *ids]
        return list(ids)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(list(context), list(continuation)) for _, context, continuation in requests]
        scores = self.score_pairs(pairs)
        for (key, _, _), score in zip(requests, scores):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (score.logprob, score.is_greedy))
        return [(s.logprob, s.is_greedy) for s in scores]

    @property
    def _piece_length(self) -> int:
        """Tokens of one scored piece: ``max_length``; at block length 1 with the logit shift one more, the last token,
        which the AR scorer predicts without feeding it (as lm-eval's ``hf`` model does)."""
        exact_ar = self.model.block_length == 1 and self.model.spec.logit_shift
        return self.max_length + 1 if exact_ar else self.max_length

    def score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[ContinuationScore]:
        """One ``ContinuationScore`` per ``(context ids, continuation ids)``, each cut into pieces that fit."""
        pieces = [(i, piece) for i, (c, x) in enumerate(pairs) for piece in windows(c, x, self._piece_length)]
        scored = self._score_pieces([piece for _, piece in pieces])
        totals = [ContinuationScore(0.0, True, 0, self.model.block_length == 1) for _ in pairs]
        for (i, _), score in zip(pieces, scored):
            t = totals[i]
            totals[i] = ContinuationScore(
                t.logprob + score.logprob, t.is_greedy and score.is_greedy, t.num_tokens + score.num_tokens,
                t.exact, (t.stderr**2 + score.stderr**2) ** 0.5,
            )
        return totals

    def _score_pieces(self, pieces: list[tuple[list[int], list[int]]]) -> list[ContinuationScore]:
        if self.model.block_length == 1:
            order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i][0]) - len(pieces[i][1]))
            out: list[ContinuationScore | None] = [None] * len(pieces)
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                for i, score in zip(batch, ar_continuation_scores(self.model, [pieces[i] for i in batch])):
                    out[i] = score
            return out
        generator = torch.Generator(device=self.model.device).manual_seed(self.seed)
        return [
            elbo_continuation_score(self.model, c, x, self.schedule, self.t_range, self.mc_samples, generator)
            for c, x in pieces
        ]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            (string,) = request.args
            pairs = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    self.tok_encode(string), self.prefix_token_id, self._piece_length - 1, 1
                )
            ]
            total = sum(s.logprob for s in self.score_pairs(pairs))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # -- generate_until ---------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        jobs = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=None) if s]
            settings = {"max_new_tokens": kwargs.pop("max_gen_toks"), **kwargs}
            if until:
                settings["stop_strings"] = until
            jobs.append((index, context, until, settings))
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list] = {}
        for job in jobs:
            groups.setdefault(repr(sorted(job[3].items())), []).append(job)
        for group in groups.values():
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                for (index, context, until, _), text in zip(batch, self._generate(batch)):
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", (context, requests[index].args[1]), text)
        return results

    def _generate(self, batch) -> list[str]:
        settings = batch[0][3]
        room = self.generation.window - self.model.block_length
        prompts = [self._with_bos(self.tok_encode(context))[-room:] for _, context, _, _ in batch]
        generators = [torch.Generator(device=self.model.device).manual_seed(self.seed + index) for index, *_ in batch]
        out = self.model.generate(
            prompts, generation_config=self.generation_config, generator=generators, tokenizer=self.tokenizer,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id, **settings,
        )
        texts = []
        for i, (_, _, until, _) in enumerate(batch):
            text = self.tokenizer.decode(out.new_tokens(i), skip_special_tokens=True)
            cuts = [text.index(s) for s in until if s in text]
            texts.append(text[: min(cuts)] if cuts else text)
        return texts


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
        raise UsageError(f"model_args {name} must be an integer >= 1, got {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line with the ``blockdiff`` model type registered. lm-eval's command line lets every
    exception through as a traceback; one of blockdiff's own (a bad model arg, a missing model directory) is printed
    as one ``error:`` line instead, with exit status 2 like ``blockdiff``'s."""
    from lm_eval.__main__ import cli_evaluate

    from blockdiff.errors import UserError

    if argv is not None:
        sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
