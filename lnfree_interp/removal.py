"""Removing LayerNorm by fine-tuning, and exporting the result in the schaeff encoding.

The procedure of arXiv 2507.02559 (section 3; code: github.com/submarat/removing-layer-norm): while
fine-tuning, the LayerNorms are removed one at a time on a schedule - the MLP-side ``ln_2`` of each
layer, then the attention-side ``ln_1`` of each layer, then ``ln_f`` - with fine-tuning steps in
between so the model adapts. A removed LN becomes a [`FakeLayerNorm`][lnfree_interp.FakeLayerNorm],
``(x - mean(x)) / s * gamma + beta``, where ``s`` is the running average of that LN's standard
deviation, frozen at removal.

`save_lnfree` exports a model whose LNs are all removed as a plain ``GPT2LMHeadModel`` in the
schaeff encoding (``weight = gamma * 1e6 / s``, ``bias = beta``, ``eps = 1e12`` on every LN module and in
the config), loadable both by this library and by plain ``GPT2LMHeadModel.from_pretrained``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from .errors import LNFreeError
from .fold import ln_names

#: eps of the exported encoding; sqrt(1e12) = 1e6 is the weight scale
EXPORT_EPS = 1e12


class FakeLayerNorm(nn.Module):
    """A GPT-2 LayerNorm that can be removed (arXiv 2507.02559 "FakeLN").

    Before `remove`: an ordinary LayerNorm, which also tracks ``running_std``, an exponential
    moving average (``momentum``) of the per-token standard deviation ``sqrt(var(x) + eps)``
    averaged over the batch and positions. After: ``(x - mean(x)) / running_std * weight + bias``,
    with ``running_std`` frozen - a centring and an affine map, linear in ``x``.

    Args:
        ln: the ``nn.LayerNorm`` to replace; its weight and bias are copied.
        momentum: weight of the newest batch in the running average.
    """

    def __init__(self, ln: nn.LayerNorm, momentum: float = 0.05):
        super().__init__()
        self.weight = nn.Parameter(ln.weight.detach().clone())
        self.bias = nn.Parameter(ln.bias.detach().clone())
        self.eps = float(ln.eps)
        self.momentum = momentum
        self.register_buffer("running_std", torch.tensor(float("nan"), dtype=ln.weight.dtype))
        self.register_buffer("removed", torch.tensor(False))

    def remove(self) -> None:
        """Freeze ``running_std`` and stop normalising."""
        if torch.isnan(self.running_std):
            raise LNFreeError("FakeLayerNorm.remove() before any training forward pass: no std recorded yet.")
        self.removed.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        centred = x - x.mean(dim=-1, keepdim=True)
        if bool(self.removed):
            return centred / self.running_std * self.weight + self.bias
        std = (centred.pow(2).mean(dim=-1, keepdim=True) + self.eps).sqrt()
        if self.training:
            with torch.no_grad():
                batch_std = std.mean().to(self.running_std.dtype)
                if torch.isnan(self.running_std):
                    self.running_std.copy_(batch_std)
                else:
                    self.running_std.lerp_(batch_std, self.momentum)
        return centred / std * self.weight + self.bias

    def extra_repr(self) -> str:
        return f"removed={bool(self.removed)}, running_std={float(self.running_std):.4g}"


@dataclass(frozen=True)
class RemovalSchedule:
    """When each LayerNorm is removed, in optimizer steps (the paper's ``start_ln2``/``gap_ln2``...).

    ``ln_2`` of layer ``l`` goes at ``start + l * gap_ln2``; then ``ln_1`` of each layer every
    ``gap_ln1`` steps; then ``ln_f`` after ``gap_lnf`` more; training continues ``tail`` steps.
    """

    start: int = 20
    gap_ln2: int = 2
    gap_ln1: int = 2
    gap_lnf: int = 2
    tail: int = 20

    def __post_init__(self) -> None:
        gaps = {"gap_ln2": self.gap_ln2, "gap_ln1": self.gap_ln1, "gap_lnf": self.gap_lnf}
        bad = {k: v for k, v in gaps.items() if v < 1}
        if bad or self.start < 0 or self.tail < 0:
            raise LNFreeError(f"RemovalSchedule needs gaps >= 1 step (one LayerNorm removed per step) and "
                              f"start, tail >= 0; got {bad or ''} start={self.start} tail={self.tail}.")

    def events(self, n_layers: int) -> list[tuple[int, str]]:
        """``(step, HF module name)`` for every removal, in order."""
        out, step = [], self.start
        for layer in range(n_layers):
            out.append((step, f"transformer.h.{layer}.ln_2"))
            step += self.gap_ln2
        for layer in range(n_layers):
            out.append((step, f"transformer.h.{layer}.ln_1"))
            step += self.gap_ln1
        step += self.gap_lnf - self.gap_ln1
        out.append((step, "transformer.ln_f"))
        return out

    def total_steps(self, n_layers: int) -> int:
        return self.events(n_layers)[-1][0] + self.tail


def install_fake_layernorms(model: nn.Module) -> nn.Module:
    """Replace every ``ln_1``/``ln_2``/``ln_f`` of a GPT-2 by a `FakeLayerNorm` (in place)."""
    for name in ln_names(model.config.n_layer):
        parent, _, child = name.rpartition(".")
        ln = model.get_submodule(name)
        if not isinstance(ln, nn.LayerNorm):
            raise LNFreeError(f"{name} is a {type(ln).__name__}, not a LayerNorm; pass a GPT-2 with LayerNorm.")
        setattr(model.get_submodule(parent), child, FakeLayerNorm(ln))
    return model


def batches(tokens: Int[Tensor, "n"], *, batch_size: int, seq_len: int, seed: int) -> Iterable[Tensor]:
    """Endless random windows ``[batch_size, seq_len]`` of a 1-D token stream (seeded)."""
    if tokens.ndim != 1 or tokens.numel() <= seq_len:
        raise LNFreeError(f"Need a 1-D token stream longer than seq_len={seq_len}, got shape {tuple(tokens.shape)}.")
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=gen)
        yield torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def train_lm(
    model: nn.Module,
    tokens: Int[Tensor, "n"],
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 32,
    seq_len: int = 128,
    warmup: int = 20,
    weight_decay: float = 0.01,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
    aux_loss: Callable[[], Tensor] | None = None,
    progress: bool = True,
    desc: str = "training",
) -> list[float]:
    """Train a causal LM in place with AdamW, linear warm-up then cosine decay to 10% (seeded).

    ``on_step(step)`` runs before each optimizer step (the removal schedule hooks in here);
    ``aux_loss()``, if given, is added to the cross-entropy after each forward pass. The batches come
    from `batches` (looked up at call time); a batch may also be a pair ``(input_ids, labels)``,
    with label ``-100`` at the positions the loss skips.

    Returns:
        The training loss (nats) of every step.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses = []
    data = batches(tokens, batch_size=batch_size, seq_len=seq_len, seed=seed)
    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=2.0)
    for step in bar:
        if on_step is not None:
            on_step(step)
        batch = next(data)
        x, labels = batch if isinstance(batch, tuple) else (batch, batch)
        loss = model(input_ids=x, labels=labels).loss
        total = loss if aux_loss is None else loss + aux_loss()
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return losses


def remove_layernorm(
    model: nn.Module,
    tokens: Int[Tensor, "n"],
    *,
    schedule: RemovalSchedule | None = None,
    lr: float = 6e-4,
    batch_size: int = 32,
    seq_len: int = 128,
    seed: int = 0,
    aux_loss_weight: float = 0.0,
    progress: bool = True,
) -> tuple[nn.Module, list[float]]:
    """Fine-tune a GPT-2 while removing its LayerNorms on a schedule (arXiv 2507.02559, section 3).

    Args:
        model: a ``transformers.GPT2LMHeadModel`` with LayerNorm (not modified: a copy is trained).
        tokens: 1-D stream of training token ids.
        schedule: when each LN goes ([`RemovalSchedule`][lnfree_interp.RemovalSchedule]); total steps follow from it.
        lr: AdamW peak learning rate (linear warm-up, cosine decay).
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        seed: seeds the initialisation-free parts: data order and dropout.
        aux_loss_weight: weight of the paper code's auxiliary loss that makes the final residual's
            per-token standard deviation uniform (``mean((std - mean(std))^2)`` at the input of
            ``ln_f``); without ``ln_f`` an outlier norm becomes an outlier logit scale. 0 disables it.
        progress: show a tqdm bar.

    Returns:
        ``(model, losses)``: the fine-tuned copy, every LN a removed [`FakeLayerNorm`][lnfree_interp.FakeLayerNorm], and
        the training loss per step (nats). Export it with [`save_lnfree`][lnfree_interp.save_lnfree].

    Raises:
        LNFreeError: the model is not a GPT-2 with LayerNorm (or was folded by this library), or
            the token stream is too short.
    """
    from transformers import GPT2LMHeadModel

    from .checkpoints import FOLDED_MARKER

    if not isinstance(model, GPT2LMHeadModel):
        raise LNFreeError(f"remove_layernorm takes a transformers GPT2LMHeadModel, got {type(model).__name__}.")
    if getattr(model.lm_head, "bias", None) is not None or getattr(model.config, FOLDED_MARKER, None):
        raise LNFreeError("This model was folded by lnfree_interp (load_hf): its unembedding bias has no place in a "
                          "plain GPT-2, so the result could not be saved. Pass the original checkpoint, e.g. "
                          "GPT2LMHeadModel.from_pretrained(path).")
    schedule = schedule or RemovalSchedule()
    model = install_fake_layernorms(copy.deepcopy(model))
    events = dict(schedule.events(model.config.n_layer))

    def on_step(step: int) -> None:
        if step in events:
            model.get_submodule(events[step]).remove()

    final: dict[str, Tensor] = {}
    handle = model.transformer.ln_f.register_forward_pre_hook(lambda m, args: final.__setitem__("r", args[0]))

    def uniform_norms() -> Tensor:
        r = final["r"]
        std = (r.var(dim=-1, unbiased=False) + 1e-5).sqrt()
        return aux_loss_weight * (std - std.mean().detach()).pow(2).mean()

    try:
        losses = train_lm(model, tokens, steps=schedule.total_steps(model.config.n_layer), lr=lr,
                          batch_size=batch_size, seq_len=seq_len, seed=seed, on_step=on_step,
                          aux_loss=uniform_norms if aux_loss_weight > 0 else None, progress=progress,
                          desc="removing LayerNorm")
    finally:
        handle.remove()
    return model, losses


def to_schaeff_encoding(model: nn.Module) -> nn.Module:
    """A plain ``GPT2LMHeadModel`` equivalent to a model whose LNs are all removed FakeLayerNorms.

    Each LN gets ``weight = gamma * sqrt(1e12) / s``, ``bias = beta``, ``eps = 1e12``; the config's
    ``layer_norm_epsilon`` becomes 1e12. The input model is not modified.

    Raises:
        LNFreeError: a LayerNorm that is not a removed [`FakeLayerNorm`][lnfree_interp.FakeLayerNorm].
    """
    from transformers import GPT2LMHeadModel

    names = ln_names(model.config.n_layer)
    pending = [n for n in names if not (isinstance(model.get_submodule(n), FakeLayerNorm)
                                        and bool(model.get_submodule(n).removed))]
    if pending:
        raise LNFreeError(f"These LayerNorms were not removed: {pending}. Run remove_layernorm to the end "
                          "of its schedule first.")
    config = copy.deepcopy(model.config)
    config.layer_norm_epsilon = EXPORT_EPS
    out = GPT2LMHeadModel(config)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith(("running_std", "removed"))}
    out.load_state_dict(sd, strict=True)
    with torch.no_grad():
        for name in names:
            fake, ln = model.get_submodule(name), out.get_submodule(name)
            ln.weight.copy_(fake.weight.double() * math.sqrt(EXPORT_EPS) / fake.running_std.double())
            ln.bias.copy_(fake.bias)
            ln.eps = EXPORT_EPS
    return out.eval()


def save_lnfree(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Save a model whose LNs were removed (`remove_layernorm`) in the schaeff encoding.

    The directory loads through every lnfree_interp loader (detected as ``"schaeff"``) and through
    plain ``GPT2LMHeadModel.from_pretrained`` (approximately: the hacked LN is exact to
    ``var(x) / 2e12`` relative).

    Args:
        model: GPT-2 whose ``ln_1``/``ln_2``/``ln_f`` are removed `FakeLayerNorm` modules.
        directory: where to write ``config.json`` and ``model.safetensors`` (created).
        tokenizer: optional tokenizer saved beside the weights.

    Returns:
        The directory.

    Raises:
        LNFreeError: some LayerNorm was not removed.
    """
    directory = Path(directory)
    to_schaeff_encoding(model).save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
