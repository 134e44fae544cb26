"""Padding-aware metrics (lnfree_interp.metrics)."""

import pytest
import torch

from lnfree_interp import LNFreeError, logit_diff, logprob

LOGITS = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_logit_diff_and_logprob_at_the_last_real_token():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for mask, last in ((right, [2, 4]), (left, [4, 4])):
        got = logit_diff([3, 4], 7)(LOGITS, mask)
        expected = torch.stack([LOGITS[b, p, a] - LOGITS[b, p, 7] for b, (p, a) in enumerate(zip(last, [3, 4]))])
        assert torch.equal(got, expected)
        lp = logprob(3)(LOGITS, mask)
        assert torch.allclose(lp, torch.stack([LOGITS[b, p].log_softmax(-1)[3] for b, p in enumerate(last)]))
    assert torch.equal(logit_diff(3)(LOGITS), LOGITS[:, -1, 3])
    assert torch.equal(logit_diff(3, pos=1)(LOGITS), LOGITS[:, 1, 3])
    assert logit_diff(3, 4).linear and not logprob(3).linear


def test_bad_metric_input():
    with pytest.raises(LNFreeError, match="string tokens"):
        logit_diff(" Mary", " John")(LOGITS)
    with pytest.raises(LNFreeError, match="outside the vocabulary"):
        logit_diff(11)(LOGITS)
    with pytest.raises(LNFreeError, match="3 answer tokens for 2 prompts"):
        logit_diff([1, 2, 3])(LOGITS)
    with pytest.raises(LNFreeError, match="outside the prompt"):
        logit_diff(1, pos=-6)(LOGITS)


def test_readout_of_a_bound_token_metric_reads_only_its_positions():
    """readout() gives Backend.run the positions a bound logit_diff / logprob reads, and a metric on the logits at
    those positions alone that equals the metric on the full logits; a plain callable keeps full logits."""
    from types import SimpleNamespace

    from lnfree_interp.metrics import bind_metric, readout

    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    backend = SimpleNamespace(d_vocab=11, tokenizer=None, device=torch.device("cpu"))
    for metric in (logit_diff([3, 4], 7), logprob(3)):
        bound = bind_metric(metric, backend, mask)
        kw = readout(bound, copies=2)
        assert kw["positions"].tolist() == [2, 4, 2, 4]
        picked = LOGITS[torch.arange(2), torch.tensor([2, 4])][:, None]  # [batch, 1, vocab]
        assert torch.equal(kw["metric"](picked), bound(LOGITS))
        assert torch.equal(bound(LOGITS), metric(LOGITS, mask))
    plain = lambda logits: logits[:, -1, 0]  # noqa: E731
    assert readout(plain) == {"metric": plain}
