"""One masked-NELBO helper (``core.loss.masked_nelbo``, docs/design.md §3) for the training loss, the lm-eval
continuation ELBO and the beam score; the beam score draws ``t`` from the same ``[noise.eps, 1]`` as evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blockdiff.config import T_EPS, NoiseConfig
from blockdiff.core.loss import masked_nelbo, nelbo


def test_masked_nelbo_is_the_weighted_cross_entropy_at_the_scored_positions_and_zero_elsewhere():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 10, (2, 6), generator=g)  # (b, n)
    sel = torch.rand(2, 6, generator=g) < 0.5  # (b, n)
    weight = torch.rand(2, 6, generator=g) + 0.5  # (b, n)
    logits = torch.randn(2, 6, 10, generator=g)  # (b, n, v)
    want = torch.zeros(2, 6)
    for i, j in sel.nonzero().tolist():
        want[i, j] = weight[i, j] * -logits[i, j].log_softmax(-1)[x0[i, j]]
    per_token = masked_nelbo(logits, x0, sel, weight)  # all rows
    assert torch.allclose(per_token, want, atol=1e-6)
    assert torch.equal(masked_nelbo(logits[sel], x0, sel, weight), per_token)  # the scored rows only: the same
    terms = torch.arange(int(sel.sum()), dtype=torch.float)  # precomputed terms (uniform noise) replace the CE
    assert torch.equal(masked_nelbo(None, x0, sel, weight, terms)[sel], weight[sel] * terms)
    out = nelbo(logits, x0, sel, weight, torch.ones_like(sel))  # the training loss sums the same terms
    assert torch.allclose(out.nll_sum, want.sum(), atol=1e-5)
    assert torch.allclose(out.nll_sum, (weight[sel] * F.cross_entropy(logits[sel], x0[sel], reduction="none")).sum())


def test_the_beam_score_samples_t_from_the_evaluation_range(monkeypatch):
    import blockdiff.sampling.beams as beams
    from blockdiff import BlockDiffusionLM, BlockDiffusionSpec, build_backbone
    from blockdiff.config import ModelConfig

    assert T_EPS == NoiseConfig().eps and NoiseConfig().eval_range == (T_EPS, 1.0)
    lows = []
    inner = beams.sample_t

    def record(shape, low, high, **kw):
        lows.append((low, high))
        return inner(shape, low, high, **kw)

    monkeypatch.setattr(beams, "sample_t", record)
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(hidden_size=32, num_layers=2, num_heads=2), 64, 32)
    model = BlockDiffusionLM(backbone, BlockDiffusionSpec(63, 4, False, 32)).eval()
    with torch.no_grad():
        model.generate([[1, 2, 3]], max_new_tokens=4, block_beams=2, beam_width=2, beam_score_draws=2,
                       eos_token_id=None, seed=0)
    assert lows and set(lows) == {NoiseConfig().eval_range}
