"""Dataset-sized inputs: split N prompts (or prompt pairs) into batches, run, and join the results.

Every attribution entry point takes ``batch_size=`` (and ``progress=``): the prompts are tokenized
once (so every batch has the same padded width), cut into batches of ``batch_size`` rows, each batch
runs exactly as a single call would, and the per-prompt values are moved to the CPU and joined
along the batch axis. Peak memory is that of one batch; the numbers equal the single-batch call's
(float64 to 1e-10, tested). Inputs may be a list of strings, token ids ``[N, pos]``, a
``datasets.Dataset`` column (``ds["text"]``), or a ``torch.utils.data.DataLoader`` whose batches are
token tensors, lists of strings, or dicts with ``input_ids`` (+ ``attention_mask``) or ``text`` -
and for pairs ``(clean, corrupted)`` tuples or ``{"clean": ..., "corrupted": ...}`` dicts, or two DataLoaders
(clean and corrupted, zipped batch by batch). Per-prompt
arguments (``answer``, ``wrong``, ``pos``, a metric's per-prompt tokens) are cut alongside; a
DataLoader's batches may carry their own ``answer`` / ``wrong`` / ``pos`` keys (read by DLA and the direct
effect; functions with a fixed metric refuse them rather than ignore them).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from itertools import zip_longest
from typing import Any

import torch
from torch import Tensor

from .errors import LNFreeError


def is_loader(x: Any) -> bool:
    """A ``torch.utils.data.DataLoader`` (batches come from it, not from ``batch_size``)."""
    return isinstance(x, torch.utils.data.DataLoader)


def wants_stream(inputs: Any, batch_size: Any, per_prompt: Any) -> bool:
    """Whether a call streams: a ``batch_size`` was given or the inputs are a DataLoader.

    Raises:
        LNFreeError: ``batch_size`` is not a positive integer, or ``per_prompt`` not a bool.
    """
    if not isinstance(per_prompt, bool):  # "no", 0, None would pick a result's shape by truthiness
        raise LNFreeError(f"per_prompt={per_prompt!r} must be True (every prompt's values) or False (their mean, "
                          "std and count).")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                   or batch_size < 1):
        raise LNFreeError(f"batch_size={batch_size!r} must be a positive integer (or None for one batch).")
    return batch_size is not None or is_loader(inputs)


def _as_list(x: Any) -> Any:
    """A ``datasets`` column (or any non-list sequence of strings) as a list; other inputs unchanged."""
    if isinstance(x, (str, Tensor, dict, list, tuple)) or hasattr(x, "input_ids"):
        return x
    if hasattr(x, "__len__") and hasattr(x, "__getitem__"):
        return list(x)
    return x


def per_prompt_count(arg: Any) -> int | None:
    """How many per-prompt values ``arg`` holds (a list, tuple, tensor or array of more than one), else ``None``
    (one value shared by every prompt: a number, a string, a 0-d tensor, a sequence of one)."""
    if isinstance(arg, (list, tuple)) or getattr(arg, "ndim", 0) >= 1:
        return len(arg) if len(arg) > 1 else None
    return None


def take(arg: Any, start: int, stop: int, n: int) -> Any:
    """``arg[start:stop]`` if it is a per-prompt value (a sequence or tensor of length ``n``), else ``arg``."""
    if callable(arg) and hasattr(arg, "take"):  # a metric with per-prompt tokens (numpy arrays have .take too)
        return arg.take(start, stop, n)
    count = per_prompt_count(arg)
    if count is None:
        return arg
    if count != n:
        raise LNFreeError(f"{count} per-prompt values (answer, wrong, pos or a metric's tokens) for {n} prompts: give "
                          "one value for all prompts or one per prompt.")
    return list(arg[start:stop]) if isinstance(arg, (list, tuple)) else arg[start:stop]


def _tokens(backend: Any, x: Any, mask: Any) -> tuple[Tensor, Tensor]:
    from .inputs import prepare

    if isinstance(x, dict) and ("input_ids" in x or "text" in x):
        if "input_ids" in x:
            ids = x["input_ids"]
            if isinstance(ids, (list, tuple)) and ids and torch.is_tensor(ids[0]):
                raise LNFreeError("A DataLoader batch's input_ids is a list of tensors: the default collate turns "
                                  "lists of token ids into one tensor per position. Give the dataset tensors (a "
                                  "Hugging Face dataset: ds.with_format('torch')) so batches are [batch, pos].")
            return prepare(backend, ids, x.get("attention_mask"))
        return prepare(backend, list(x["text"]))
    return prepare(backend, _as_list(x), mask)


def _batch_keys(item: Any, keys: bool, given: dict[str, Any]) -> dict[str, Any]:
    """A DataLoader batch's ``answer`` / ``wrong`` / ``pos`` keys; refused when the caller does not read them,
    or when the call also gives them as arguments (``given``: which would win is a guess)."""
    extra = {k: item[k] for k in ("answer", "wrong", "pos") if isinstance(item, dict) and k in item}
    clash = [k for k in extra if given.get(k) is not None and not (k == "pos" and given[k] == -1)]
    if clash:
        raise LNFreeError(f"The DataLoader's batches carry {clash} and the call gives "
                          f"{', '.join(f'{k}={given[k]!r}' for k in clash)} too: pass {clash[0]}=None to use the "
                          "batches' values, or drop the key from the batches.")
    if extra and not keys:
        raise LNFreeError(f"The DataLoader's batches carry {sorted(extra)}, which this function does not read (its "
                          "metric is fixed): build the metric with per-prompt tokens instead, e.g. "
                          "logit_diff(answers, wrongs), and pass token tensors with batch_size=.")
    return extra


def batches(backend: Any, inputs: Any, batch_size: int | None, *, corrupted: Any = None, mask: Any = None,
            c_mask: Any = None, per_prompt: dict[str, Any] | None = None,
            keys: bool = True) -> Iterator[dict[str, Any]]:
    """Yield ``{"inputs": (tokens, mask), "corrupted": (tokens, mask) | None, **per_prompt}`` per batch.

    ``keys``: whether the caller reads ``answer`` / ``wrong`` / ``pos`` keys of a DataLoader's batches
    (else such keys raise: silently ignoring them would attribute another metric).

    Raises:
        LNFreeError: per-prompt values of another length than the prompts (or with a DataLoader), a
            DataLoader pair where single prompts are expected, unread batch keys, mismatched loaders.
    """
    per_prompt = dict(per_prompt or {})
    pair_wanted = corrupted is not None or "metric" in per_prompt
    if is_loader(inputs) and corrupted is not None and not is_loader(corrupted):
        raise LNFreeError("The clean prompts are a DataLoader, the corrupted ones are not: pass a DataLoader for each "
                          "(zipped batch by batch), or one DataLoader of (clean, corrupted) pairs and corrupted=None.")
    if is_loader(inputs):  # per-prompt arguments cannot be cut to a DataLoader's batches
        cut = [k for k, v in per_prompt.items() if per_prompt_count(v) or (  # a value, or a metric's tokens
               hasattr(v, "take") and any(per_prompt_count(getattr(v, a, None)) for a in ("answer", "wrong", "pos")))]
        if cut:
            raise LNFreeError(f"Per-prompt {', '.join(cut)} cannot be cut to a DataLoader's batches: put them in the "
                              "batches as 'answer' / 'wrong' / 'pos' keys (DLA, direct effect), or pass token tensors "
                              "with batch_size=.")
    if is_loader(inputs) and is_loader(corrupted):  # two loaders: their batches are zipped, one pair per batch
        for n, (item, c_item) in enumerate(zip_longest(inputs, corrupted, fillvalue=None)):
            if item is None or c_item is None:
                raise LNFreeError(f"The clean and corrupted DataLoaders have different numbers of batches (they part "
                                  f"at batch {n}); give them the same dataset length and batch size.")
            extra = _batch_keys(item, keys, per_prompt)
            clean_part, corr_part = _tokens(backend, item, None), _tokens(backend, c_item, None)
            if clean_part[0].shape[0] != corr_part[0].shape[0]:
                raise LNFreeError(f"Batch {n}: {clean_part[0].shape[0]} clean prompts but {corr_part[0].shape[0]} "
                                  "corrupted ones; give both DataLoaders the same batch size.")
            yield {"inputs": clean_part, "corrupted": corr_part, **per_prompt, **extra}
        return
    if is_loader(inputs):
        for item in inputs:
            extra = _batch_keys(item, keys, per_prompt)
            if isinstance(item, dict):
                if "clean" in item:
                    item = (item["clean"], item["corrupted"])
            pair = isinstance(item, (tuple, list)) and len(item) == 2 and not isinstance(item[0], str)
            if pair and not pair_wanted:
                raise LNFreeError("The DataLoader yielded a pair (e.g. TensorDataset(tokens, mask)), but this call "
                                  "takes single prompts: for token ids with a mask yield dicts {'input_ids': ..., "
                                  "'attention_mask': ...}; for corrupted prompts pass them (or a second DataLoader) "
                                  "as the corrupted / ablation argument.")
            if pair_wanted or pair:
                if not (isinstance(item, (tuple, list)) and len(item) == 2):
                    raise LNFreeError("For prompt pairs the DataLoader must yield (clean, corrupted) tuples or "
                                      f"{{'clean': ..., 'corrupted': ...}} dicts; got {type(item).__name__}.")
                yield {"inputs": _tokens(backend, item[0], None), "corrupted": _tokens(backend, item[1], None),
                       **per_prompt, **extra}
            else:
                if not isinstance(item, (Tensor, list, dict)) or isinstance(item, dict) and not (
                        "input_ids" in item or "text" in item):
                    raise LNFreeError(f"The DataLoader yielded a {type(item).__name__}; batches must be token tensors "
                                      "[batch, pos], lists of strings, or dicts with input_ids / text.")
                yield {"inputs": _tokens(backend, item, None), "corrupted": None, **per_prompt, **extra}
        return
    if pair_wanted and corrupted is None:
        raise LNFreeError("Prompt pairs need corrupted prompts (or a DataLoader of (clean, corrupted) pairs).")
    tokens, m = _tokens(backend, inputs, mask)
    c = None if corrupted is None else _tokens(backend, corrupted, c_mask)
    n = tokens.shape[0]
    if c is not None and c[0].shape[0] != n:
        raise LNFreeError(f"{n} clean prompt(s) but {c[0].shape[0]} corrupted: pass one corrupted prompt per clean "
                          "prompt.")
    step = batch_size or n
    for start in range(0, n, step):
        stop = min(n, start + step)
        yield {"inputs": (tokens[start:stop], m[start:stop]),
               "corrupted": None if c is None else (c[0][start:stop], c[1][start:stop]),
               **{k: take(v, start, stop, n) for k, v in per_prompt.items()}}


def run_batches(call: Callable[[dict[str, Any]], Any], parts: Iterator[dict[str, Any]], progress: bool,
                desc: str, per_prompt: bool) -> Any:
    """``call`` on every batch (with a tqdm bar), results joined along the batch axis on the CPU, or with
    ``per_prompt=False`` folded into a `Running` summary as they come (memory flat in N)."""
    from tqdm.auto import tqdm

    results, running = [], Running()
    for part in tqdm(parts, desc=desc, disable=not progress, mininterval=1.0):
        result = to_cpu(call(part))
        if per_prompt:
            results.append(result)
        else:
            running.add(result)
    if not results and not running.n:
        raise LNFreeError("No prompts: the inputs (or the DataLoader) were empty.")
    return concat(results) if per_prompt else running.result()


def _per_prompt_tensors(result: Any) -> dict[tuple[str, str], Tensor]:
    """A result's tensors whose last axis is the prompt: fields (``values``, ``metric``, ``bias``...) and
    ``extra`` entries (``metric_clean``...), keyed ``("", name)`` / ``("extra", key)``."""
    import dataclasses

    out = {("", f.name): getattr(result, f.name) for f in dataclasses.fields(result)
           if isinstance(getattr(result, f.name), Tensor)}
    out.update({("extra", k): v for k, v in result.extra.items() if isinstance(v, Tensor) and v.ndim >= 1})
    return out


class Running:
    """The mean over prompts of every per-prompt tensor of a result, the standard deviation over prompts
    of each component's value (positions summed), and for DLA the figures its exactness check reads,
    updated batch by batch (the pairwise update of Chan, Golub & LeVeque 1979, float64 on the CPU), so
    that memory is one result's worth whatever the number of prompts.

    `result` gives the first batch's result with every per-prompt tensor replaced by its mean
    (``[..., 1]``, in the tensor's dtype) and ``extra["n_prompts"]``, ``extra["std"]`` (``[component]``,
    float64, NaN for one prompt); for DLA (``kind="dla"``) also ``extra["max_sum_error"]`` and
    ``extra["scale"]``, the largest ``|sum of components + bias - metric|`` and the largest summand scale
    (``sum |values| + |bias|``, or ``|metric|``) over the prompts: what `AttributionResult.assert_exact`
    checks on the per-prompt values, so a summary passes it exactly when the prompts would.
    """

    def __init__(self) -> None:
        self.n = 0
        self.first: Any = None
        self.means: dict[tuple[str, str], Tensor] = {}
        self.score_mean = self.score_m2 = torch.zeros(())
        self.max_sum_error = self.scale = 0.0

    def add(self, result: Any) -> Running:
        """Fold in one batch's per-prompt result.

        Raises:
            LNFreeError: a result of another kind or shape than the first batch's (e.g. per-position
                results over DataLoader batches of different padded widths), or one that is already a summary.
        """
        if "n_prompts" in result.extra:
            raise LNFreeError("This result is already a summary (per_prompt=False): its values are a mean over "
                              f"{result.extra['n_prompts']} prompts, not one prompt each.")
        tensors = _per_prompt_tensors(result)
        b = int(result.values.shape[-1])
        if self.first is None:
            self.first, self.means = result, {k: torch.zeros(v.shape[:-1], dtype=torch.float64)
                                              for k, v in tensors.items()}
            self.score_mean = self.score_m2 = torch.zeros(result.values.shape[0], dtype=torch.float64)
        else:
            keys = getattr(result, "labels", None), getattr(self.first, "labels", None)
            shapes = {k: (tuple(v.shape[:-1]), tuple(self.means[k].shape) if k in self.means else None)
                      for k, v in tensors.items()}
            if keys[0] != keys[1] or set(tensors) != set(self.means) or any(x != y for x, y in shapes.values()):
                raise LNFreeError(f"Batches gave results of different shapes ({result.values.shape[:-1]} vs "
                                  f"{self.first.values.shape[:-1]}): per-position results need every batch padded "
                                  "to one width (pass a list or a token tensor, not a DataLoader of varying widths).")
        total = self.n + b
        for key, value in tensors.items():
            self.means[key] += (value.detach().double().mean(-1) - self.means[key]) * (b / total)  # batch: last
        values = result.values.detach().double()
        score = values.sum(1) if values.ndim > 2 else values  # [component, batch]
        batch_mean = score.mean(1)
        delta = batch_mean - self.score_mean
        self.score_mean = self.score_mean + delta * (b / total)
        within = (score - batch_mean[:, None]).pow(2).sum(1)
        self.score_m2 = self.score_m2 + within + delta.pow(2) * (self.n * b / total)
        if result.kind == "dla":  # keep what assert_exact checks per prompt (a mean can hide cancelling errors)
            bias = torch.zeros(b, dtype=torch.float64) if result.bias is None else result.bias.detach().double()
            error = values.flatten(0, -2).sum(0) + bias - result.metric.detach().double()
            scale = values.abs().flatten(0, -2).sum(0) + bias.abs()
            self.max_sum_error = max(self.max_sum_error, float(error.abs().max()))
            metric = float(result.metric.detach().abs().max())  # pragma: no mutate (|metric| <= scale + error)
            self.scale = max(self.scale, float(scale.max()), metric)
        self.n = total
        return self

    def result(self) -> Any:
        """The summary result (see the class doc)."""
        import dataclasses

        first = self.first
        means = {k: m[..., None].to(_per_prompt_tensors(first)[k].dtype) for k, m in self.means.items()}
        std = (self.score_m2 / (self.n - 1)).sqrt()  # one prompt: 0 / 0 = NaN
        extra = {**first.extra, **{k: v for (where, k), v in means.items() if where == "extra"},
                 "n_prompts": self.n, "std": std}
        if first.kind == "dla":
            extra.update(max_sum_error=self.max_sum_error, scale=self.scale)
        return dataclasses.replace(first, **{k: v for (where, k), v in means.items() if where == ""}, extra=extra)


def summarise(result: Any) -> Any:
    """A per-prompt result as its `Running` summary (mean, std and count over its prompts)."""
    return Running().add(result).result()


def stream_pairs(fn: Callable[..., Any], model: Any, clean: Any, corrupted: Any, metric: Any, *, chunk: int | None,
                 show_progress: bool, attention_mask: Any = None, corrupted_attention_mask: Any = None,
                 per_prompt: bool, **kwargs: Any) -> Any:
    """``fn(model, clean, corrupted, metric, **kwargs)`` (a patching-style function) over batches of ``chunk``
    prompt pairs (a DataLoader's own batches when ``clean`` is one), joined (or summarised: ``per_prompt``)."""
    from .backends import get_backend

    parts = batches(get_backend(model), clean, chunk, corrupted=corrupted, mask=attention_mask,
                    c_mask=corrupted_attention_mask, per_prompt={"metric": metric}, keys=False)
    def call(p: dict[str, Any]) -> Any:
        return fn(model, p["inputs"][0], p["corrupted"][0], p["metric"], attention_mask=p["inputs"][1],
                  corrupted_attention_mask=p["corrupted"][1], **kwargs)

    return run_batches(call, parts, show_progress, getattr(fn, "__name__", "batches"), per_prompt)


def to_cpu(result: Any) -> Any:
    """Move a result's tensors to the CPU (in place) so device memory stays flat while streaming."""
    for key, value in vars(result).items():
        if isinstance(value, Tensor):
            setattr(result, key, value.detach().cpu())
    extra = getattr(result, "extra", None)
    if isinstance(extra, dict):
        for key, value in extra.items():
            if isinstance(value, Tensor):
                extra[key] = value.detach().cpu()
    return result


def concat(results: list[Any]) -> Any:
    """Join results of the same kind along their last (batch) axis.

    Raises:
        LNFreeError: results with different labels or shapes (e.g. per-position results over batches
            of different padded widths from a DataLoader).
    """
    import dataclasses

    first = results[0]
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(first):
        values = [getattr(r, f.name) for r in results]
        if isinstance(values[0], Tensor):
            shapes = {tuple(v.shape[:-1]) for v in values}
            if len(shapes) != 1:
                raise LNFreeError(f"Batches gave {f.name} of different shapes {sorted(shapes)}: per-position results "
                                  "need every batch padded to one width (pass a list or a token tensor, not a "
                                  "DataLoader of varying widths).")
            changes[f.name] = torch.cat(values, -1)
        elif f.name == "extra":
            extra = dict(values[0])
            for key, value in extra.items():
                if isinstance(value, Tensor) and value.ndim >= 1:
                    extra[key] = torch.cat([v[key] for v in values], -1)
            changes[f.name] = extra
        elif f.name in ("labels", "edges") and any(v != values[0] for v in values):
            raise LNFreeError("Batches gave different components; this is a bug, please report it.")
    return dataclasses.replace(first, **changes)
