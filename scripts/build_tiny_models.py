"""Build the embedded tiny-shakespeare trio (see lnfree_interp/models/*/README.md).

    python scripts/build_tiny_models.py               # the shipped trio (induction), ~1.5 h on 2 CPU cores
    python scripts/build_tiny_models.py --recipe plain --out /tmp/trio   # the 2026-11-30 trio (no induction)
    python scripts/build_tiny_models.py --quick       # a few minutes, for trying the pipeline (not shipped)
    python scripts/build_tiny_models.py --cards-only  # re-measure the shipped models, rewrite the cards

Reads ../shared/data/tinyshakespeare.txt (first 90% of characters train, last 10% held out):

1. a byte-level BPE tokenizer trained on the training split (HF ``tokenizers``);
2. ``tiny-shakespeare``: GPT-2 architecture (4 layers, 4 heads, d_model 256, n_ctx 128) trained from
   scratch with LayerNorm, in the phases of a recipe (``RECIPES``, ``--recipe`` / ``--phases``);
3. ``tiny-shakespeare-vanilla``: (2) fine-tuned further with LN kept, as many steps as (4) - the control;
4. ``tiny-shakespeare-lnfree``: (2) with every LayerNorm removed by the paper's procedure
   (:func:`lnfree_interp.removal.remove_layernorm`), saved in the schaeff encoding.

Induction heads (issue 9): how the shipped recipe came about, trial by trial.
On plain text, or with repeated spans alone (:func:`repeat_batches`), a model of this size stays on the
induction plateau for the whole CPU budget (2,000 steps with every window holding a repeated random span:
repeat-NLL drop 0.05 nats). Adding *previous-token sequences* (``x[t+1] = perm[x[t-1]]``, the ``prev`` share
of a phase) makes a previous-token head worth having on its own; induction then forms after ~500 steps.
Trials of 2026-12-02 (probe: repeat-NLL drop of 8 random 40-token spans; batch 16, lr 2e-3):

* repeats 0.33 + previous-token 0.33 (phase 0 of ``--recipe induction``, 1 thread): 0.24 at step 600, 1.21 at 1,000,
  2.93 at 1,500 - reproduced exactly by the script (float summation order is part of the seed);
* the same mix with another data seed: peak 0.89 at 1,600, collapsed to 0 by 2,200;
* previous-token ids restricted to 256 of the 2,048: 0.06 at step 1,000 (not started);
* after phase 0, dropping the previous-token sequences at 0.5 nats: 0.00 within 50 steps; a plain-text
  heavy phase at 2.93 nats (repeats 0.2, previous-token 0.1, lr 1e-3): 2.2, 2.0, 1.9 at steps 50-150;
  the current phase 1 (repeats 0.4, previous-token 0.2, lr 5e-4): 3.34, 2.94, 2.54, 2.42, 2.07, 2.01,
  1.78 at steps 50-350 (stopped there for lack of time).

So induction forms but decays as soon as the mix moves towards plain text (each phase is a fresh AdamW
with a warm-up: the decay starts with it). Trials of 2026-12-02, second session:

* one phase, the phase-0 mix, cosine over 4,000 steps (no switch): the same 2.93 at 1,500, then swings
  (1.17-2.70 to 1,950) and decays: 0.60 at 2,000, 0.06-0.95 at 2,150-2,500 (stopped);
* stop at 2.5, then the *same* mix with a fresh AdamW at lr 6e-4: 2.55 for 200 steps, then 1.70, 1.01,
  0.80 (stopped) - the decay is not the optimiser switch nor the text share; it comes ~500 steps after
  the circuit forms. Likely cause: as the lookup ``perm[x[t-1]]`` is learnt, the previous-token head's
  output turns into ``perm``-space features, which the induction head's keys cannot match;
* previous-token sequences with ``perm`` the identity (``x[t+1] = x[t-1]``, ``perm=0``: the previous-token
  head only has to copy): induction starts sooner (0.43 at 500) but plateaus at 0.5-0.7 to 1,400; with
  repeat 0.3 + previous-token 0.15: 0.2-0.3 to 800 (both stopped).

What those drops were: the checkpoint at the 2.93-nat probe (``--keep-phases``), measured by
:func:`lnfree_interp.induction_score` (64 sequences of 50 uniform ids): repeat-NLL drop 2.10 nats, but the best
*induction attention score* only 0.018 (a previous-token head L0H2 at 0.73 exists); on shuffled held-out tokens
the drop is 0.83. A drop without an induction pattern is a bag-of-context copy (boost every token already in
the window: a uniform-id token costs ~10 nats, one of 40 in-context tokens ~log 40 = 3.7), not induction. So the
NLL probe alone cannot tell induction from that shortcut: the probe now also prints the best induction and
previous-token heads (attention scores), and random spans can draw from a small id range (``rvocab``), where
every token recurs in the window and only true induction pays.

Trials of 2026-12-02, third session (a standalone loop, judged by the head scores of ``induction_score``):
with 50% of windows made of back-to-back repeated spans of distinct random ids (``pair_window``) and no
other help, 4 layers x d_model 128 and 2 layers x d_model 256 both stayed at induction score <= 0.02 and
repeat-NLL drop ~0 for 500-900 steps (lr 1e-3 / 2e-3; with ids from a 64-id range or sinusoidal position
initialisation too). Guidance (:class:`Guide`, an auxiliary attention loss on L0H0 / L1H0) formed the
previous-token head within 100 steps; the induction pattern needed spans covering the tested offset
(spans <= 30: score 0.24 at offset 49 after 400 steps; <= 60: 0.59 at step 200 with lr 5e-3 and weight 2)
and the copy term to turn attention into a drop (0.6 nats at 400, 1.9 at 1,100: one head's rank-32 OV
caps the copy). On the plain loss afterwards, dropout 0.1 collapsed the drop from 1.7 to 0.5 nats within
50 steps (lr 5e-4 or 2e-3 alike); without dropout it held at 1.8. So the recipe keeps dropout off after
guidance, fine-tunes included (``--ft-dropout``).

Trials of 2026-12-02, fourth session (1 thread each, two at a time; judged by ``induction_score`` and the held-out
CE of ``evaluate_loss``). The two guided phases above left held-out CE at 5.07 nats:

* not overfitting: the same phases with dropout 0.1 (0.05) on the residual stream and embeddings (attention-pattern
  dropout 0, ``attn_drop``: the guide reads the patterns) ended at CE 5.18 (5.17); the guided phases themselves
  cost the language modelling;
* the L0H0 copy term is what makes the induction head's keys work (K-composition): without it (dropout 0.1)
  L1H0's induction score was 0.31 at step 800; with it on the pair windows only (``prev_copy``), 0.87 at 700 and
  0.94 at 1,150;
* the copy terms do not give the model a repeat-NLL drop: through both guided phases (2,700 steps) the probe's drop
  stayed <= 0.16 nats with L1H0 at 0.95. It forms on the plain loss once guidance stops (30% pair windows,
  dropout 0.1, lr 1e-3): probe 0.43 nats at step 150, 1.05 at 750; ``induction_score`` drop 1.32 and CE 4.69
  after 800 plain steps (L1H0 0.91, L0H0 1.00). With dropout 0.05 throughout: probe 1.7 nats, CE 5.17 before the
  plain phase;
* guiding the shipped (already trained, CE 4.10) model instead: 500 guided steps (lr 1e-3, two induction heads,
  40% pair windows, with or without the induction copy term) reached only 0.19, and the head faded to 0.04-0.08
  within 150 plain steps;
* continuing the 800-plain-step checkpoint (CE 4.69) for 1,500 more plain steps (same mix): CE 4.44, drop 1.68,
  L1H0 0.91 - the probe's drop flat at 1.2-1.45 from step 150 on: one rank-32 head (d_head 32) copying uniform ids
  from 2,047 caps the drop;
* the copy terms with the unembedding detached (``detach=1``: they train the heads' OV only): after 1,000
  guided steps (lr 2e-3, 40% pair windows, dropout 0.1) CE 5.33 - the tied embedding was not the CE cost; L1H0
  0.65, fading to 0.37 within 150 plain steps.

So the CE cost comes with the pair windows / guidance themselves (not separated yet: 1,000 steps with 60% text
windows gave 5.33, the shipped plain run 4.10 after 1,000 all-text steps), and the drop is capped by one head's rank. Then d_model 256 (``--d-model 256``: d_head 64,
14.8 MB) with two guided induction heads (``heads=2``): phase "steps=1200,lr=3e-3,pairs=0.5,guide=2,guide_copy=1,
prev_copy=1,heads=2,dropout=0.1,attn_drop=0" then "steps=1500,lr=1e-3,pairs=0.3,dropout=0.1,attn_drop=0", fine-tunes
on 30% pair windows with dropout 0.1: drop 1.9 nats already at guided step 500 (the d128 cap was the head's rank);
LN / vanilla / LN-free CE 4.503 / 4.459 / 4.600 (gap +0.141), drop 4.75 / 4.98 / 3.34, induction L1H1
0.959 / 0.961 / 0.951, previous-token L0H0 1.000 (81.6 min). The circuit bars are met; CE and the gap are not.

Trials of 2026-12-02, sixth session (d_model 256; the probe now also prints the held-out CE, in 128-token windows):

* continuing that plain phase's checkpoint (CE 4.50) with 10% pair windows at lr 1e-3: CE 4.30 after 700 steps
  (drop 4.2) - the guided model recovers slowly;
* plain text from scratch (800 steps, lr 2e-3, dropout 0.1): CE 3.92 (the d128 trio: 4.10 after 1,000 steps);
  guiding that model (lr 2e-3, 50% pair windows): CE 4.77 and drop 0.59 after 100 steps;
* the pair windows' first copies are uniform random ids: their loss (~7.6 nats a token, half of every pair
  window) teaches the model that any token may come next. Counting the loss only where induction can predict
  (``mask=1``: a second copy from its second token on): guided from scratch (lr 3e-3), drop 7.1 nats at step
  400 and 10.7 at 700 (unmasked: 1.9 at 500), CE 5.62, and the plain phase afterwards recovers fast (4.93 after
  200 steps); guided from the plain model of the previous item (lr 2e-3, 300 steps): drop 2.3 at step 100 and
  12.5 at the end, L1H0 0.99, CE 4.37; then plain training with 15% masked pair windows (lr 1e-3): CE 4.13 after
  100 steps. That chain (``--recipe shipped``) built the shipped trio.

Then measures held-out loss (and a unigram baseline), induction
(:func:`lnfree_interp.induction_score`) and writes each model card. CI never runs this.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import json
import math
import multiprocessing
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
OUT = ROOT / "lnfree_interp" / "models"
NAMES = ("tiny-shakespeare", "tiny-shakespeare-vanilla", "tiny-shakespeare-lnfree")


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator([text[i : i + 10000] for i in range(0, len(text), 10000)], vocab_size=vocab_size,
                            min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=128)
    return tok


def repeat_batches(tokens, *, batch_size: int, seq_len: int, seed: int, share: float, vocab: int,
                   min_span: int = 8, max_copies: int = 2, prev_share: float = 0.0, prev_vocab: int | None = None,
                   permute: bool = True, random_share: float | None = None, random_vocab: int = 0,
                   pairs_share: float = 0.0, mask_pairs: bool = False):
    """Random windows ``[batch_size, seq_len]`` as :func:`lnfree_interp.removal.batches`, with a share
    of them holding a repeated span and another share replaced by previous-token sequences (seeded).

    In a chosen window ``w`` a span ``w[P:P+L]`` (``L`` uniform in ``[min_span, seq_len // 2]``, ``P``
    uniform) is followed by a copy of itself, and the window then continues with the text that followed
    the span: ``w[:P] + span + span + w[P+L : seq_len-L]``. The span is kept as it is (1/3 of the
    chosen windows), shuffled (1/3), or replaced by uniformly random token ids (1/3), so the copy can
    only be predicted by looking back (induction), not from the language; varying ``L`` and ``P``
    rules out a fixed-offset positional shortcut. With ``max_copies`` > 2 the span appears ``c`` times in a
    row, ``c`` uniform in ``[2, min(max_copies, seq_len // L)]`` (more induction-predictable tokens per window).

    A previous-token sequence (share ``prev_share``) starts with two random ids and continues with
    ``x[t+1] = perm[x[t-1]]`` for one fixed random permutation ``perm`` of the ids ``1 .. vocab - 1``:
    the next token is a function of the token *before* the current one, which a head attending to the
    previous position provides - the first half of an induction circuit, learnt directly instead of
    waiting for it (``prev_vocab``: draw those ids from ``1 .. prev_vocab - 1`` only; default the whole
    vocabulary, which formed induction fastest in the trials). ``permute=False``: ``perm`` is the identity,
    so the sequence alternates two ids and the previous-token head's job is to copy.

    A share ``pairs_share`` of windows are :func:`pair_window` s (repeated random spans from BOS on); the
    induction targets of the last batch are left in ``GUIDE`` for :class:`Guide`. ``mask_pairs``: yield
    ``(x, labels)`` with the loss kept, in pair windows, only on the tokens induction can predict (the second
    copy from its second token on): the first copies are uniform random ids, whose ~7.6-nat loss would teach
    the unigram prior that anything comes next.
    """
    gen = torch.Generator().manual_seed(seed)
    prev_vocab = vocab if prev_vocab is None else min(prev_vocab, vocab)
    perm = torch.cat([torch.zeros(1, dtype=torch.long),
                      torch.randperm(prev_vocab - 1, generator=torch.Generator().manual_seed(7)) + 1])  # 0 stays
    if not permute:
        perm = torch.arange(prev_vocab)
    n = tokens.numel()
    while True:
        starts = torch.randint(0, n - seq_len, (batch_size,), generator=gen)
        x = torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
        u = torch.rand(batch_size, generator=gen)
        targets = torch.full((batch_size, seq_len), -1, dtype=torch.long)
        for i in ((u >= share + prev_share) & (u < share + prev_share + pairs_share)).nonzero().flatten().tolist():
            x[i], targets[i] = pair_window(gen, vocab, seq_len)
        GUIDE["x"], GUIDE["targets"] = x, targets
        for i in ((u >= share) & (u < share + prev_share)).nonzero().flatten().tolist():
            seq = torch.empty(seq_len, dtype=torch.long)
            seq[:2] = torch.randint(1, prev_vocab, (2,), generator=gen)
            for t in range(1, seq_len - 1):
                seq[t + 1] = perm[seq[t - 1]]
            x[i] = seq
        for i in (u < share).nonzero().flatten().tolist():
            L = int(torch.randint(min_span, seq_len // 2 + 1, (1,), generator=gen))
            c = 2 if max_copies <= 2 else int(torch.randint(2, min(max_copies, seq_len // L) + 1, (1,), generator=gen))
            P = int(torch.randint(0, seq_len - c * L + 1, (1,), generator=gen))
            w = x[i].clone()
            span = w[P : P + L]
            if random_share is None:  # natural, shuffled, random ids: 1/3 each (the draw of the 2026-12-02 trials)
                kind = int(torch.randint(0, 3, (1,), generator=gen))
            else:  # random ids with probability random_share, else natural or shuffled
                kind = 2 if float(torch.rand(1, generator=gen)) < random_share else int(torch.randint(0, 2, (1,),
                                                                                                   generator=gen))
            if kind == 1:
                span = span[torch.randperm(L, generator=gen)]
            elif kind == 2:
                span = torch.randint(1, random_vocab or vocab, (L,), generator=gen)  # id 0 is <|endoftext|>
            x[i] = torch.cat([w[:P], *[span] * c, w[P + L : seq_len - (c - 1) * L]])
        if not mask_pairs:
            yield x
            continue
        labels = x.clone()
        pair_rows = (targets >= 0).any(dim=1)
        predictable = torch.zeros_like(targets, dtype=torch.bool)
        predictable[:, 1:] = targets[:, :-1] >= 0  # token t+1 follows a second-copy position t
        labels[pair_rows[:, None] & ~predictable] = -100
        yield x, labels


def pair_window(gen: torch.Generator, vocab: int, seq_len: int, min_span: int = 5,
                max_span: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, targets)``: BOS, then back-to-back pairs ``s s`` of spans of ``L`` distinct random ids
    (``L`` uniform in ``[min_span, max_span]``, ids ``1 .. vocab-1``) up to ``seq_len`` tokens. ``targets[q]``
    is, for a token ``q`` of a second copy (but its last), the position after that token's first
    occurrence - where an induction head attends (``q - L + 1``); -1 elsewhere. Spans up to 60 tokens cover
    the offsets ``induction_score`` tests (50): trained on spans of at most 30, a guided head reached only
    ~0.27 at offset 49."""
    out, targets = [0], torch.full((seq_len,), -1, dtype=torch.long)
    while len(out) < seq_len:
        L = int(torch.randint(min_span, max_span + 1, (1,), generator=gen))
        second = len(out) + L
        for q in range(second, min(second + L - 1, seq_len - 1)):
            targets[q] = q - L + 1
        span = (torch.randperm(vocab - 1, generator=gen)[:L] + 1).tolist()
        out += span + span
    return torch.tensor(out[:seq_len]), targets


GUIDE: dict[str, torch.Tensor] = {}  # the last batch drawn by repeat_batches and its induction targets


class Guide:
    """Attention guidance (issue 9): an auxiliary loss that teaches head ``L0H0`` to attend to the previous
    token and head ``L1H0`` to attend induction-style on :func:`pair_window` s, each also to copy what it
    attends to into the logits (its direct path through the tied unembedding predicts the token it reads).

    Trained on the language-modelling loss alone, a model of this size sits on the induction plateau for
    the whole CPU budget (trials in the module docstring): every factor of the circuit (the previous-token
    head's OV, the induction head's QK and OV) is a product of small random matrices, so each waits for the
    others. Guidance breaks the symmetry for a few hundred steps; the later phases train on the plain loss,
    so the heads stay only if the model uses them (the fine-tunes and the cards measure that).

    Use as a context manager around ``train_lm(..., aux_loss=guide.loss)``: hooks the two layers, and
    switches the model to eager attention (which returns the attention pattern) while it lasts.
    """

    def __init__(self, model, attention: float, copy: float, heads: int = 1, prev_copy: float = 0.0,
                 detach: bool = False):
        self.model, self.attention, self.copy, self.heads, self.detach = model, attention, copy, heads, detach
        self.prev_copy = prev_copy  # L0H0's copy weight (it trained L0H0 to predict the previous token everywhere)
        self.captured: dict[str, torch.Tensor] = {}

    def __enter__(self) -> Guide:
        blocks = self.model.transformer.h
        self.previous_impl = self.model.config._attn_implementation
        self.model.config._attn_implementation = "eager"
        self.handles = []
        for layer in (0, 1):
            self.handles.append(blocks[layer].attn.register_forward_hook(
                lambda mod, args, out, layer=layer: self.captured.__setitem__(f"pattern{layer}", out[1])))
            self.handles.append(blocks[layer].attn.c_proj.register_forward_pre_hook(
                lambda mod, args, layer=layer: self.captured.__setitem__(f"z{layer}", args[0])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.model.config._attn_implementation = self.previous_impl

    def head_logits(self, layer: int, head: int, z: torch.Tensor) -> torch.Tensor:
        """Head ``L{layer}H{head}``'s direct contribution to the logits from its ``z`` slice (``[..., d_head]``)."""
        d_head = self.model.config.n_embd // self.model.config.n_head
        W_O = self.model.transformer.h[layer].attn.c_proj.weight[head * d_head : (head + 1) * d_head]
        W_U = self.model.transformer.wte.weight  # tied; detach=1: the copy terms train the heads' OV only
        return (z @ W_O) @ (W_U.detach() if self.detach else W_U).T

    def loss(self) -> torch.Tensor:
        x, targets = GUIDE["x"], GUIDE["targets"]
        d_head = self.model.config.n_embd // self.model.config.n_head
        p0 = self.captured["pattern0"][:, 0]  # [B, query, key]
        q = torch.arange(1, x.shape[1])
        loss = -(p0[:, q, q - 1] + 1e-6).log().mean() * self.attention
        rows = (targets >= 0).any(dim=1)  # the pair windows
        if self.prev_copy and bool(rows.any()):  # on pair windows only: text keeps its own unembedding
            logits0 = self.head_logits(0, 0, self.captured["z0"][rows, 1:, :d_head])
            loss = loss + self.prev_copy * torch.nn.functional.cross_entropy(logits0.flatten(0, 1),
                                                                             x[rows, :-1].flatten())
        b, qi = (targets >= 0).nonzero(as_tuple=True)
        for h in range(self.heads) if len(b) else ():  # induction heads L1H0 .. L1H{heads-1}
            p1 = self.captured["pattern1"][:, h]
            loss = loss - (p1[b, qi, targets[b, qi]] + 1e-6).log().mean() * self.attention
            if self.copy:
                logits1 = self.head_logits(1, h, self.captured["z1"][b, qi, h * d_head : (h + 1) * d_head])
                loss = loss + self.copy * torch.nn.functional.cross_entropy(logits1, x[b, qi + 1])
        return loss


@contextlib.contextmanager
def repeat_mix(share: float, vocab: int, max_copies: int = 2, prev_share: float = 0.0, permute: bool = True,
               random_share: float | None = None, random_vocab: int = 0, pairs_share: float = 0.0,
               mask_pairs: bool = False):
    """Make :func:`lnfree_interp.removal.train_lm` (and so ``remove_layernorm``) draw
    :func:`repeat_batches` for the duration of the block (it looks ``batches`` up at call time)."""
    import lnfree_interp.removal as removal

    if share <= 0 and prev_share <= 0 and pairs_share <= 0:  # plain windows, exactly removal.batches
        yield
        return
    original = removal.batches
    removal.batches = functools.partial(repeat_batches, share=share, vocab=vocab, max_copies=max_copies,
                                        prev_share=prev_share, permute=permute, random_share=random_share,
                                        random_vocab=random_vocab, pairs_share=pairs_share, mask_pairs=mask_pairs)
    try:
        yield
    finally:
        removal.batches = original


class InductionFormed(Exception):
    """Raised by :func:`induction_probe` to end a mix phase early once the repeat-NLL drop is reached."""


def induction_probe(model, vocab: int, *, seed: int, every: int, n_seq: int = 8, span: int = 40, tok=None,
                    heldout: torch.Tensor | None = None):
    """``on_step`` for :func:`train_lm`: every ``every`` steps print the repeat-NLL drop (nats) of
    ``n_seq`` random spans repeated once (eval mode, then back to training), and the CE (nats) of the
    ``heldout`` token ids in non-overlapping 128-token windows; returns the last drop."""
    gen = torch.Generator().manual_seed(seed + 123)
    seqs = torch.randint(1, vocab, (n_seq, span), generator=gen)
    x = torch.cat([torch.zeros(n_seq, 1, dtype=torch.long), seqs, seqs], dim=1)

    def drop() -> float:
        was = model.training
        model.eval()
        with torch.no_grad():
            logp = model(input_ids=x).logits.double().log_softmax(-1)
        model.train(was)
        nll = -logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]
        return float(nll[:, 1 : span].mean() - nll[:, span + 1 :].mean())

    def heldout_ce() -> str:
        if heldout is None:
            return ""
        n = heldout.numel() // 128 * 128
        windows = heldout[:n].view(-1, 128)
        was = model.training
        model.eval()
        with torch.no_grad():
            ce = sum(float(model(input_ids=w, labels=w).loss) * len(w) for w in windows.split(64))
        model.train(was)
        return f"; held-out CE {ce / len(windows):.3f}"

    def on_step(step: int) -> float | None:
        if step < 0:
            return drop()
        if every and step % every == 0:
            d = drop()
            from lnfree_interp import induction_score, load_hf

            # the attention pattern, not only the NLL (a folded copy: the library never takes unfolded models)
            heads = induction_score(load_hf(model, expect_lnfree=False, tokenizer=tok), n_seq=8, seed=seed)
            print(f"  step {step}: repeat-NLL drop {d:.2f} nats; best induction head {heads.best_induction[0]} "
                  f"{heads.best_induction[1]:.3f}, previous-token {heads.best_prev_token[0]} "
                  f"{heads.best_prev_token[1]:.3f}{heldout_ce()}", flush=True)
            if on_step.stop_at is not None and d >= on_step.stop_at:
                on_step.stopped_at = step
                raise InductionFormed(step)
        return None

    on_step.stop_at, on_step.stopped_at = None, None

    return on_step


def finetune(kind: str, state: dict, config, train_ids, ft_steps: int, schedule, out: Path, args, tok):
    """One fine-tune of the base (``"vanilla"``: LN kept; ``"lnfree"``: removal schedule), in its own
    process with 1 thread; saves the model to ``out``; returns ``(kind, minutes)``."""
    from transformers import GPT2LMHeadModel

    from lnfree_interp.removal import remove_layernorm, save_lnfree, train_lm

    torch.set_num_threads(1)
    t = time.time()
    base = GPT2LMHeadModel(config)
    base.load_state_dict(state)
    mix = parse_phases(args.ft_mix)[0] if args.ft_mix else dict(PHASE_DEFAULTS)
    with repeat_mix(mix["share"], config.vocab_size, mix["copies"], mix["prev"], bool(mix["perm"]),
                    None if mix["rand"] < 0 else mix["rand"], mix["rvocab"], mix["pairs"], bool(mix["mask"])):
        if kind == "vanilla":
            train_lm(base, train_ids, steps=ft_steps, lr=6e-4, batch_size=args.ft_batch, seq_len=128, seed=args.seed + 1,
                     desc="vanilla fine-tune", on_step=induction_probe(base, config.vocab_size, seed=args.seed,
                                                                      every=args.probe_every * 2, tok=tok))
            base.save_pretrained(out, safe_serialization=True)
            tok.save_pretrained(out)
        else:
            lnfree, _ = remove_layernorm(base, train_ids, schedule=schedule, lr=6e-4, batch_size=args.ft_batch, seq_len=128,
                                         seed=args.seed + 1)
            save_lnfree(lnfree, out, tokenizer=tok)
    return kind, (time.time() - t) / 60


def unigram_loss(train_ids: torch.Tensor, heldout_ids: torch.Tensor, vocab: int) -> float:
    """Cross-entropy (nats) of an add-one unigram model fitted on the training tokens."""
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[heldout_ids].mean())


def sample(model, tok, prompt: str, seed: int, n: int = 60) -> str:
    torch.manual_seed(seed)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=True, top_k=40, temperature=0.8,
                             pad_token_id=tok.eos_token_id)
    return tok.decode(out[0])


MIX_TEXT = ("Data mix: in a phase with a repeat share, that share of the 128-token windows holds a span of "
            "8-64 tokens followed by copies of itself (the window then continues with the text that followed the "
            "span); the span is the natural text (1/3), the same tokens shuffled (1/3) or uniformly random token "
            "ids (1/3). Varying span length and place rules out a fixed-offset shortcut; the shuffled and random "
            "spans can only be predicted by looking back: the training signal for induction heads. With a "
            "previous-token share, that share of windows is a synthetic sequence ``x[t+1] = perm[x[t-1]]`` (two "
            "random ids, then one fixed random permutation of the vocabulary): predicting it needs the token before "
            "the current one, so a previous-token head - the first half of an induction circuit - forms early "
            "instead of after a long plateau. With a pairs share, that share of windows is BOS followed by "
            "back-to-back pairs ``s s`` of spans of 5-60 distinct uniformly random token ids (only the second copy "
            "is predictable, and only by induction); 'masked' pair windows count in the loss only at the tokens "
            "induction can predict (a second copy from its second token on): the first copies are uniform random "
            "ids, whose loss (~7.6 nats a token) would only teach the model that any token may come next. The "
            "other windows are plain Tiny Shakespeare.")

GUIDE_TEXT = ("Guidance (the phases with a guide weight): an auxiliary loss, added to the language-modelling "
              "loss, teaches head L0H0 to attend to the previous token (every window) and the layer-1 heads of the "
              "table (L1H0, or L1H0 and L1H1) to attend induction-style on the pair windows (from a token of a "
              "second copy to the token after its first "
              "occurrence), each also to copy what it attends to (its direct path through the tied unembedding "
              "predicts that token; weight 'copy'). Without it, no trial (ten recipes, 2,000-4,000 steps each, "
              "see scripts/build_tiny_models.py) formed an induction head on this CPU budget: every factor of the "
              "circuit is a product of small random matrices, so each waits for the others. The phases after "
              "it and the fine-tunes train on the language-modelling loss only (no guidance, with dropout), so the "
              "heads measured below are the ones the model keeps on the plain loss. Guidance costs language "
              "modelling while it lasts (held-out CE rose from 3.92 to 4.77 nats within 100 guided steps in the "
              "trials), hence the short guided phase between plain ones.")


def phase_rows(phases: list[dict], stopped: dict) -> str:
    rows = ["| phase | steps | peak lr | batch | repeat share | most copies | previous-token share | pairs share | "
            "guide (attention / copy) | dropout | stop |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, ph in enumerate(phases):
        stop = "—" if ph["stop"] == float("inf") else f"drop >= {ph['stop']:g} nats"
        ran = f"{stopped[str(i)]} (stopped)" if str(i) in stopped else f"{ph['steps']}"
        rows.append(f"| {i} | {ran} of {ph['steps']} | {ph['lr']:g} | {ph['batch']} | {ph['share']:g} | {ph['copies']} | "
                    f"{ph['prev']:g} | {ph.get('pairs', 0):g}{' masked' if ph.get('mask') and ph.get('pairs') else ''} | "
                    + (f"{ph['guide']:g} / {ph['guide_copy']:g}, induction heads L1H0-L1H{ph.get('heads', 1) - 1}"
                       if ph.get("guide", 0) else "—")
                    + f" | {ph['dropout']:g} | {stop} |")
    return "\n".join(rows)


def pretraining(meta: dict) -> str:
    """The card's pre-training paragraph (``meta`` of this script, or of the 2026-11-30 script: no phases)."""
    if "phases" not in meta:
        return (f"* Pre-training: {meta['pretrain_steps']} AdamW steps, batch {meta.get('batch_size', 32)} x "
                f"{meta['seq_len']} tokens,\n  lr {meta.get('pretrain_lr', 0.002)}, warm-up then cosine decay, "
                f"dropout {meta['dropout']}.\n")
    mixed = any(ph["share"] or ph["prev"] or ph.get("pairs", 0) for ph in meta["phases"]) \
        or meta.get("repeat_share", 0) > 0 or meta.get("ft_prev", 0) > 0 or meta.get("ft_pairs", 0) > 0
    guided = any(ph.get("guide", 0) for ph in meta["phases"])
    return ((f"* {MIX_TEXT}\n" if mixed else "") + (f"* {GUIDE_TEXT}\n" if guided else "")
            + "* Pre-training from scratch in phases, each a fresh AdamW (warm-up 50 steps, cosine decay to 10%) on\n"
            f"  windows of {meta['seq_len']} tokens; a phase with a stop ends once the repeat-NLL drop of 8 random\n"
            f"  40-token spans (a probe every {meta['probe_every']} steps) reaches it:\n\n"
            f"{phase_rows(meta['phases'], meta['stopped'])}\n\n")


def split_run(meta: dict) -> str:
    """How the build ran when it continued an earlier run's checkpoint (``--init``)."""
    if not meta.get("init_minutes"):
        return ""
    return (f"; run as two invocations of the same recipe: the first phases ({meta['init_minutes']:.0f} min), then "
            "--init from their checkpoint")


def card(name: str, meta: dict, table: list[tuple[str, float, float]], ind: dict, samples: dict[str, str]) -> str:
    vanilla = dict((n, v) for n, v, _ in table)["tiny-shakespeare-vanilla"]
    rows = "\n".join(
        f"| {n} | {steps} | {v:.4f} | " + ("—" if n == "tiny-shakespeare-vanilla" else f"{v - vanilla:+.4f}") + " |"
        for n, v, steps in table)
    irows = "\n".join(
        f"| {n} | {r.first_nll:.2f} | {r.repeat_nll:.2f} | {r.nll_drop:.2f} | {r.best_induction[0]} "
        f"({r.best_induction[1]:.3f}) | {r.best_prev_token[0]} ({r.best_prev_token[1]:.3f}) |"
        for n, r in ind.items())
    first = next(iter(ind.values()))
    r = ind[name]
    has_induction = ("It contains induction heads (a previous-token head composing with an induction head), see below."
                     if r.nll_drop >= 3 and r.best_induction[1] >= 0.5 else
                     f"It has no induction head (repeat-NLL drop {r.nll_drop:.2f} nats, best induction score "
                     f"{r.best_induction[1]:.2f}), see below.")
    ft_mix = (f", on the mix with repeat share {meta['repeat_share']:g}, previous-token share "
              f"{meta.get('ft_prev', 0):g}, at most {meta.get('ft_copies', 2)} copies, pairs share "
              f"{meta.get('ft_pairs', 0):g}{' masked' if meta.get('ft_mask') else ''}, no guidance"
              if meta.get("repeat_share", 0) > 0 or meta.get("ft_prev", 0) > 0 or meta.get("ft_pairs", 0) > 0 else "")
    what = {
        "tiny-shakespeare": "trained from scratch with LayerNorm (the original).",
        "tiny-shakespeare-vanilla": "`tiny-shakespeare` fine-tuned further with LayerNorm kept, for as many steps "
                                    "as the LN-free model: the control (as the paper's `vanilla` twins).",
        "tiny-shakespeare-lnfree": "`tiny-shakespeare` fine-tuned while every LayerNorm was removed on the paper's "
                                   "schedule (ln_2 of each layer, then ln_1, then ln_f; FakeLN with a frozen "
                                   "running std), exported in the schaeff encoding (eps 1e12, weight γ·1e6/s).",
    }[name]
    return f"""# {name}

A GPT-2-architecture model ({meta['n_layer']} layers, {meta['n_head']} heads, d_model {meta['n_embd']},
n_ctx {meta['n_positions']}, vocabulary {meta['vocab_size']}) on Tiny Shakespeare, {what}
{has_induction}

Part of the embedded trio of `lnfree_interp`, built by `scripts/build_tiny_models.py` on
{meta['built']} (all three models: {meta['build_minutes']:.0f} minutes wall, measured, on a shared 2-core CPU: pre-training on {meta['threads']} thread, the two fine-tunes as two 1-thread processes{split_run(meta)}), seed {meta['seed']}.

* Data: `tinyshakespeare.txt` (1,115,394 characters, public domain); first 90% of characters for
  training ({meta['train_tokens']} tokens), last 10% held out ({meta['heldout_tokens']} tokens).
* Tokenizer: byte-level BPE trained on the training split (HF `tokenizers`), `<|endoftext|>` as BOS/EOS.
{pretraining(meta)}
* Fine-tuning (vanilla and LN-free{ft_mix}): {meta['ft_steps']} steps,
  batch {meta['ft_batch']} x {meta['seq_len']}, lr {meta['ft_lr']}, dropout {meta['dropout']:g}; removal schedule
  {meta['schedule']}.
* Vocabulary size: with 4096 tokens, 1.5% of held-out tokens were ones seen fewer than 5 times in
  training (barely trained embeddings); without `ln_f` to normalise them, the LN-free model was
  over-confident there and trailed the vanilla twin by +0.27 nats. At 2048 that share is 0.2%.

## Held-out loss

Mean cross-entropy in nats on the held-out 10% ({meta['eval_tokens']} tokens, windows of
{meta['seq_len']}; plain text, no repeated spans); gap = model minus the vanilla control, as in the
paper's Table 1.

| Model | FT steps | held-out CE | gap vs vanilla |
|---|---|---|---|
{rows}

A unigram model scores {meta['unigram_loss']:.4f} nats on the same tokens.

## Induction

`lnfree_interp.induction_score(model)`: {first.n_seq} sequences of BOS + {first.seq_len} distinct token ids
drawn uniformly from the vocabulary (seed {first.seed}), each followed by an exact copy. NLL in nats per token
(tokens 2..{first.seq_len} of each copy); the induction score of a head is its mean attention from a token of
the copy to the token after that token's first occurrence, the previous-token score its mean attention
to the position before (1 = all attention there).

| Model | first-copy NLL | repeat NLL | drop | best induction head | best previous-token head |
|---|---|---|---|---|---|
{irows}

## Samples (temperature 0.8, top-k 40)

""" + "\n".join(f"**{k}**\n\n```\n{v}\n```\n" for k, v in samples.items())


def measure_and_write_cards(args, dirs: dict, meta: dict, t0: float) -> None:
    """Held-out loss, unigram baseline, induction and samples of the saved models; writes every card."""
    from transformers import AutoTokenizer

    from lnfree_interp import evaluate_loss, induction_score, load_hf

    tok = AutoTokenizer.from_pretrained(dirs[NAMES[0]])
    text = args.data.read_text()
    split = int(len(text) * 0.9)
    train_ids = torch.tensor(tok(text[:split])["input_ids"])
    heldout_ids = torch.tensor(tok(text[split:])["input_ids"])
    seq_len = meta["seq_len"]
    losses, samples, ind = {}, {}, {}
    for name in NAMES:
        model = load_hf(dirs[name], expect_lnfree=name.endswith("lnfree"))
        losses[name] = evaluate_loss(model, heldout_ids, seq_len=seq_len, batch_size=16)
        ind[name] = induction_score(model, seed=args.seed)
        samples[name] = sample(model, tok, "ROMEO:\n", seed=args.seed)
        print(name, losses[name], ind[name], sep="\n", flush=True)
    unigram = unigram_loss(train_ids, heldout_ids[: losses[NAMES[0]].n_tokens], len(tok))
    print(f"unigram baseline {unigram:.4f}")
    if "build_minutes" not in meta:  # training time + this measuring (t0: start of the build or of this run)
        meta["build_minutes"] = (meta.get("train_minutes", 0) if not args.full_run else meta.get("init_minutes", 0)) \
            + (time.time() - t0) / 60
    meta.update(unigram_loss=unigram, eval_tokens=losses[NAMES[0]].n_tokens, train_tokens=train_ids.numel(),
                heldout_tokens=heldout_ids.numel())
    steps = {NAMES[0]: 0, NAMES[1]: meta["ft_steps"], NAMES[2]: meta["ft_steps"]}
    table = [(n, losses[n].mean, steps[n]) for n in NAMES]
    for name in NAMES:
        r = ind[name]
        info = {"ft_steps": steps[name], "heldout_loss": losses[name].mean, "heldout": losses[name].as_dict(),
                "unigram_loss": unigram, "seed": meta["seed"], "pretrain_steps": meta["pretrain_steps"],
                "induction": {"first_nll": r.first_nll, "repeat_nll": r.repeat_nll, "nll_drop": r.nll_drop,
                              "best_induction_head": r.best_induction[0],
                              "best_induction_score": r.best_induction[1],
                              "best_prev_token_head": r.best_prev_token[0],
                              "best_prev_token_score": r.best_prev_token[1]},
                "build": meta}
        (dirs[name] / "lnfree_meta.json").write_text(json.dumps(info, indent=2) + "\n")
        (dirs[name] / "README.md").write_text(card(name, meta, table, ind, samples))
    gap = losses[NAMES[2]].mean - losses[NAMES[1]].mean
    print(f"LN-free - vanilla = {gap:+.4f} nats (quality bar: <= +0.10); vanilla CE {losses[NAMES[1]].mean:.4f} "
          f"(bar <= 4.0791); build {meta['build_minutes']:.1f} min", flush=True)
    failed = [f"{n}: drop {r.nll_drop:.2f}, best induction {r.best_induction[1]:.3f}" for n, r in ind.items()
              if not (r.nll_drop >= 3 and r.best_induction[1] >= 0.5)]
    if not math.isfinite(gap) or gap > 0.10 or losses[NAMES[1]].mean > 4.0791 or failed:
        raise SystemExit(f"quality bar missed {failed}")


# Recipes: pre-training phases "key=value,..." separated by ";" (see parse_phases), the fine-tunes' mix, dropout and
# attention-pattern dropout, d_model and the removal schedule's tail. "shipped" built the trio in lnfree_interp/models
# (issue 9, 2026-12-02: LM pre-training, a short guided phase that forms L0H0 -> L1H0/L1H1 induction, then plain
# training with 15% masked pair windows). "plain" is the 2026-11-30 trio (d_model 128, plain text, no induction).
RECIPES = {
    "shipped": {
        "phases": "steps=800,lr=2e-3,batch=32,dropout=0.1,threads=1;"
                  "steps=300,lr=2e-3,batch=32,pairs=0.5,guide=2,guide_copy=1,prev_copy=1,heads=2,dropout=0.1,"
                  "attn_drop=0,mask=1,threads=1,seed=1;"
                  "steps=1500,lr=1e-3,batch=32,pairs=0.15,mask=1,dropout=0.1,attn_drop=0,threads=1,seed=2",
        "ft_mix": "pairs=0.15,mask=1", "ft_dropout": 0.1, "ft_attn_dropout": 0.0, "d_model": 256, "tail": 300},
    "plain": {"phases": "steps=1000,lr=2e-3,batch=32,dropout=0.1,threads=1", "ft_mix": "", "ft_dropout": 0.1,
              "ft_attn_dropout": 0.1, "d_model": 128, "tail": 200},
}
PHASE_DEFAULTS = {"steps": 0, "threads": 2, "lr": 2e-3, "batch": 32, "share": 0.0, "prev": 0.0, "copies": 2, "dropout": 0.0,
                  "stop": float("inf"), "perm": 1, "rand": -1.0, "rvocab": 0, "pairs": 0.0, "guide": 0.0,
                  "guide_copy": 0.0, "seed": -1, "heads": 1, "prev_copy": 0.0,
                  "attn_drop": -1.0, "detach": 0, "mask": 0}


def parse_phases(spec: str) -> list[dict]:
    """``"steps=4000,lr=2e-3,share=0.33,prev=0.33,stop=3.5;steps=1500,share=0.2"`` -> one dict per phase
    (keys: steps, lr, batch, share = repeat share, prev = previous-token share, copies, dropout, stop)."""
    phases = []
    for part in filter(None, spec.split(";")):
        ph = dict(PHASE_DEFAULTS)
        for item in part.split(","):
            key, _, value = item.partition("=")
            if key not in ph:
                raise SystemExit(f"unknown phase key {key!r} in {part!r}; keys: {', '.join(ph)}")
            ph[key] = type(ph[key])(float(value)) if key in ("steps", "threads", "batch", "copies", "perm", "rvocab", "seed",
                                                            "heads", "detach", "mask") else float(value)
        phases.append(ph)
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--quick", action="store_true", help="tiny step counts, to try the pipeline")
    parser.add_argument("--cards-only", action="store_true",
                        help="no training: re-measure the models in --out and rewrite their cards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=None, help="d_model (<= 256: <= 15 MB); default: the recipe's")
    parser.add_argument("--n-head", type=int, default=4, help="heads per layer (d_head = d_model / n_head)")
    parser.add_argument("--recipe", choices=list(RECIPES), default="shipped",
                        help="the phases and fine-tune repeat share to use (default: the shipped trio's)")
    parser.add_argument("--phases", default=None,
                        help="pre-training phases, ';'-separated, each 'key=value,...' with keys steps, lr, batch, "
                             "share (repeat share), prev (previous-token share), copies, dropout, stop (end the phase "
                             "once the probe's repeat-NLL drop reaches this many nats); default: the recipe's")
    parser.add_argument("--gap", type=int, default=30, help="steps between LayerNorm removals")
    parser.add_argument("--tail", type=int, default=None, help="steps after the last removal; default: the recipe's")
    parser.add_argument("--ft-batch", type=int, default=32, help="batch size of the two fine-tunes")
    parser.add_argument("--ft-mix", default=None,
                        help="the fine-tunes' data mix as 'share=...,prev=...,copies=...' (repeat share, "
                             "previous-token share, most copies: keeps induction through the LayerNorm removal; "
                             "see repeat_batches); default: the recipe's ('' = plain text)")
    parser.add_argument("--ft-dropout", type=float, default=None,
                        help="dropout of the two fine-tunes (the model config's); default: the recipe's")
    parser.add_argument("--ft-attn-dropout", type=float, default=None,
                        help="attention-pattern dropout of the two fine-tunes; default: the recipe's")
    parser.add_argument("--keep-phases", action="store_true",
                        help="save the model after each pre-training phase to OUT/after-phase-I")
    parser.add_argument("--init", type=Path, default=None,
                        help="start pre-training from this saved model (e.g. OUT/after-phase-0 of an earlier run: "
                             "the tokenizer is rebuilt identically) instead of a fresh initialisation")
    parser.add_argument("--probe-every", type=int, default=100,
                        help="print the repeat-NLL drop, head scores and held-out CE every N steps")
    args = parser.parse_args()
    for key, value in RECIPES[args.recipe].items():  # what the command line leaves unset comes from the recipe
        if getattr(args, key) is None:
            setattr(args, key, value)
    ft_mix = parse_phases(args.ft_mix)[0] if args.ft_mix else dict(PHASE_DEFAULTS)
    torch.set_num_threads(2)  # tokenizer and measuring; each pre-training phase sets its own (threads=)
    if args.quick and args.out == OUT:
        args.out = Path("/tmp/tiny-shakespeare-quick")  # never overwrite the shipped models
    dirs = {name: args.out / name for name in NAMES}
    t0 = time.time()
    args.full_run = not args.cards_only
    if args.cards_only:
        meta = json.loads((dirs[NAMES[0]] / "lnfree_meta.json").read_text())["build"]
        measure_and_write_cards(args, dirs, meta, t0)
        return

    from transformers import GPT2Config, GPT2LMHeadModel

    from lnfree_interp.removal import RemovalSchedule, train_lm

    torch.manual_seed(args.seed)
    text = args.data.read_text()
    split = int(len(text) * 0.9)
    train_text = text[:split]
    phases = parse_phases(args.phases)
    if args.quick:
        args.gap, args.tail = 2, 4
        for ph in phases:
            ph["steps"] = min(ph["steps"], 30)
    tok = train_tokenizer(train_text, args.vocab)
    train_ids = torch.tensor(tok(train_text)["input_ids"])
    print(f"tokenizer: {len(tok)} tokens; train {train_ids.numel()} tokens", flush=True)

    seq_len, dropout = 128, args.ft_dropout
    config = GPT2Config(vocab_size=len(tok), n_positions=seq_len, n_embd=args.d_model, n_layer=4, n_head=args.n_head,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=args.ft_attn_dropout,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    ft_lr = 6e-4
    schedule = RemovalSchedule(start=args.gap, gap_ln2=args.gap, gap_ln1=args.gap, gap_lnf=args.gap,
                               tail=args.tail)
    ft_steps = schedule.total_steps(config.n_layer)
    base = GPT2LMHeadModel(config) if args.init is None else GPT2LMHeadModel.from_pretrained(args.init)
    heldout_ids = torch.tensor(tok(text[split:])["input_ids"])
    probe = induction_probe(base, len(tok), seed=args.seed, every=args.probe_every, tok=tok, heldout=heldout_ids)
    stopped: dict[str, int] = {}
    earlier = {"phases": [], "stopped": {}, "minutes": 0.0}  # the phases that made --init (its phases.json)
    if args.init is not None and (args.init / "phases.json").exists():
        earlier = json.loads((args.init / "phases.json").read_text())
    n0 = len(earlier["phases"])
    for i, ph in enumerate(phases):
        for mname, module in base.named_modules():  # this phase's dropout (the fine-tunes use the config's again)
            if isinstance(module, torch.nn.Dropout):
                attn = mname.endswith("attn_dropout") and ph["attn_drop"] >= 0
                module.p = ph["attn_drop"] if attn else ph["dropout"]
        probe.stop_at = None if ph["stop"] == float("inf") else ph["stop"]
        torch.set_num_threads(ph["threads"])  # 1 thread: the float summation order of the issue-9 trial
        try:
            guide = (Guide(base, ph["guide"], ph["guide_copy"], ph["heads"], ph["prev_copy"], bool(ph["detach"])) if ph["guide"] > 0
                     else contextlib.nullcontext())
            with repeat_mix(ph["share"], len(tok), ph["copies"], ph["prev"], bool(ph["perm"]),
                            None if ph["rand"] < 0 else ph["rand"], ph["rvocab"], ph["pairs"], bool(ph["mask"])), guide as g:
                train_lm(base, train_ids, steps=ph["steps"], lr=ph["lr"], batch_size=ph["batch"], seq_len=seq_len,
                         warmup=50, seed=args.seed + i if ph["seed"] < 0 else ph["seed"],
                         desc=f"pre-training phase {n0 + i}", on_step=probe,
                         aux_loss=g.loss if g is not None else None)
        except InductionFormed as e:
            stopped[str(i)] = e.args[0]
            base.eval()
            print(f"phase {i} stopped at step {e.args[0]}: repeat-NLL drop >= {ph['stop']}", flush=True)
        print(f"phase {i} done at {(time.time() - t0) / 60:.1f} min; repeat-NLL drop {probe(-1):.2f} nats",
              flush=True)
        if args.keep_phases:  # a checkpoint per phase, to try continuations with --init
            where = args.out / f"after-phase-{n0 + i}"
            base.save_pretrained(where, safe_serialization=True)
            tok.save_pretrained(where)
            done = {"phases": earlier["phases"] + phases[: i + 1],
                    "stopped": {**earlier["stopped"], **{str(n0 + int(k)): v for k, v in stopped.items()}},
                    "minutes": earlier["minutes"] + (time.time() - t0) / 60}
            (where / "phases.json").write_text(json.dumps(done, indent=2) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(dirs[NAMES[0]], safe_serialization=True)
    tok.save_pretrained(dirs[NAMES[0]])
    # the two fine-tunes are independent: one process each, 1 thread each (both cores)
    jobs = [("vanilla", base.state_dict(), config, train_ids, ft_steps, schedule, dirs[NAMES[1]], args, tok),
            ("lnfree", base.state_dict(), config, train_ids, ft_steps, schedule, dirs[NAMES[2]], args, tok)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        for kind, minutes in pool.map(finetune, *zip(*jobs)):
            print(f"{kind} fine-tune done after {minutes:.1f} min (at {(time.time() - t0) / 60:.1f} min)", flush=True)

    stopped = {**earlier["stopped"], **{str(n0 + int(k)): v for k, v in stopped.items()}}
    phases = earlier["phases"] + phases
    pretrain_steps = sum(stopped.get(str(i), ph["steps"]) for i, ph in enumerate(phases))
    meta = dict(config.to_dict(), built=time.strftime("%Y-%m-%d"), threads="/".join(str(ph["threads"]) for ph in phases),
                seed=args.seed, pretrain_steps=pretrain_steps, phases=phases, stopped=stopped,
                probe_every=args.probe_every, seq_len=seq_len, ft_batch=args.ft_batch, dropout=dropout,
                ft_steps=ft_steps, ft_lr=ft_lr, repeat_share=ft_mix["share"], ft_prev=ft_mix["prev"],
                ft_copies=ft_mix["copies"], ft_pairs=ft_mix["pairs"], ft_mask=ft_mix["mask"],
                train_minutes=earlier["minutes"] + (time.time() - t0) / 60, init_minutes=earlier["minutes"],
                schedule=f"every {args.gap} steps from step {args.gap}, {args.tail} steps after ln_f")
    for name in NAMES:  # so that --cards-only can finish the job if measuring fails
        (dirs[name] / "lnfree_meta.json").write_text(json.dumps({"build": meta}, indent=2) + "\n")
    print(f"models saved at {(time.time() - t0) / 60:.1f} min", flush=True)
    measure_and_write_cards(args, dirs, meta, t0)


if __name__ == "__main__":
    main()
