"""Checkpoint sources and [`inspect_checkpoint`][lnfree_interp.inspect_checkpoint] (known names: `registry`).

A *source* is a Hub id (read through the normal Hugging Face cache, so it works offline once
cached), a registry alias, a local directory, or an in-memory ``GPT2LMHeadModel``. Weights are read
lazily, tensor by tensor, from safetensors (single file or sharded with
``model.safetensors.index.json``; headers checked against the file sizes before anything is read)
or ``torch.load(weights_only=True, mmap=True)`` for legacy ``.bin`` files; nothing from a checkpoint
is ever executed (no ``trust_remote_code``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from .errors import LNFreeError
from .fold import LNState, classify_layernorms, detect_encoding, ln_names
from .registry import EMBEDDED_DIR, KnownCheckpoint, lookup

#: ``config.lnfree_interp`` marker written on models this library folded (encoding 4).
FOLDED_MARKER = "lnfree_interp"

# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

SourceLike = Union[str, os.PathLike, "torch.nn.Module"]

_OLD_BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$")


def _hf_key(key: str) -> str:
    """Normalise a GPT-2 checkpoint key to ``GPT2LMHeadModel`` naming (gpt2's files lack the prefix)."""
    return key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"


#: safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors, format spec)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class _SafetensorsFile:
    """One ``.safetensors`` file, read tensor by tensor with plain file reads into fresh tensors.

    The header is parsed and checked against the file size when the file is opened, so a
    truncated or corrupt file fails before any tensor is read. Reads go straight into the tensor
    that is returned (no memory map: mapped pages would count as the process's resident memory
    for as long as the map lives, up to the whole checkpoint on top of the model).
    """

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > size - 8:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
        self.base = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ValueError(f"tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
            itemsize = torch.empty((), dtype=dtype).element_size()
            if end - start != math.prod(shape) * itemsize or start < 0:
                raise ValueError(f"tensor {name!r}: {end - start} bytes for shape {list(shape)}")
            if self.base + end > size:
                raise ValueError(f"tensor {name!r} ends at byte {self.base + end} but the file has {size} bytes "
                                 "(truncated)")
            self.entries[name] = (dtype, shape, start, end)
        self._file: Any = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def get_tensor(self, name: str) -> Tensor:
        dtype, shape, start, end = self.entries[name]
        out = torch.empty(shape, dtype=dtype)
        if end == start:
            return out
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        self._file.seek(self.base + start)
        got = 0
        while got < end - start:
            n = self._file.readinto(buf[got:])
            if not n:
                raise LNFreeError(f"{self.path} ended while reading {name!r} (truncated while loading?); "
                                  "download it again.")
            got += n
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _LazyWeights(Mapping):
    """Read-only mapping over checkpoint files; tensors are read on access (each read returns a
    fresh tensor that nothing else holds). ``weight_map`` (from a sharded checkpoint's index) must
    agree with the files' contents."""

    def __init__(self, files: list[Path], weight_map: Mapping[str, str] | None = None):
        self._handles: list[Any] = []
        self._where: dict[str, tuple[Any, str]] = {}
        for f in files:
            try:
                if f.suffix == ".safetensors":
                    h = _SafetensorsFile(f)
                    self._handles.append(h)
                    items = [(k, (h, k)) for k in h.keys()]
                else:
                    sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
                    items = [(k, (sd, k)) for k in sd]
            except Exception as err:  # json, OS, safetensors / pickle errors
                self.close()
                raise LNFreeError(f"Cannot read weight file {f}: {err}. The file is corrupt or "
                                  "incomplete; download it again.") from err
            for k, where in items:
                if not _OLD_BUFFERS.search(k):
                    self._where[_hf_key(k)] = where
        if weight_map:
            wrong = [k for k, file in weight_map.items() if not _OLD_BUFFERS.search(k) and (
                _hf_key(k) not in self._where or getattr(self._where[_hf_key(k)][0], "path", Path(file)).name
                != Path(file).name)]
            if wrong:
                self.close()
                raise LNFreeError(f"The checkpoint index names tensors its shards do not hold where it says "
                                  f"({', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''}); the index and "
                                  "the shards are from different downloads. Download the checkpoint again.")

    @property
    def fresh_tensors(self) -> bool:
        """Every access reads a new tensor that nothing else holds (all files are safetensors), so a consumer
        may write into it (`fold.fold_state_dict` folds readers in place)."""
        return all(isinstance(h, _SafetensorsFile) for h, _ in self._where.values())

    def __getitem__(self, key: str) -> Tensor:
        try:
            handle, k = self._where[key]
        except KeyError:
            raise KeyError(key) from None
        return handle.get_tensor(k) if hasattr(handle, "get_tensor") else handle[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        for h in self._handles:
            h.close()
        self._handles.clear()
        self._where.clear()


@dataclass
class Source:
    """A resolved checkpoint: config, lazily-read weights and where the tokenizer lives."""

    label: str
    config: Any  #: transformers.GPT2Config
    state_dict: Mapping[str, Tensor]
    module_eps: dict[str, float]
    owned: bool  #: the tensors belong to us (False for a user's in-memory model)
    directory: Path | None = None
    known: KnownCheckpoint | None = None
    tokenizer: Any = None

    @property
    def n_layers(self) -> int:
        return int(self.config.n_layer)

    def close(self) -> None:
        if isinstance(self.state_dict, _LazyWeights):
            self.state_dict.close()


def _check_config(config: Any, label: str) -> None:
    from transformers import GPT2Config

    if not isinstance(config, GPT2Config) or getattr(config, "model_type", None) != "gpt2":
        arch = getattr(config, "model_type", type(config).__name__)
        raise LNFreeError(f"{label} is a {arch!r} model; lnfree_interp supports GPT-2 "
                          "(GPT2LMHeadModel) checkpoints only.")
    # options that change the computation are checked per backend at load time (builders.hf.check_variant)


def _weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of a checkpoint directory, and the sharded index's weight map (or None).

    Raises:
        LNFreeError: an unreadable index, an index naming a missing shard, no weight file.
    """
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise LNFreeError(f"{index} is not a valid checkpoint index ({type(err).__name__}: {err}); "
                                  "download it again.") from err
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise LNFreeError(f"{directory} is missing weight shards {missing} named by {index_name}; "
                                  "download them again.")
            return [directory / s for s in shards], weight_map
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).exists():
            return [directory / name], None
    raise LNFreeError(f"No weight file in {directory}: expected model.safetensors (or pytorch_model.bin). "
                      "Save the model with model.save_pretrained(directory).")


def _download(repo_id: str) -> Path:
    """Snapshot of a Hub repo through the HF cache (works offline once cached)."""
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*.json",
                "vocab.json", "merges.txt", "special_tokens_map.json", "generation_config.json"]
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns))
        if not list(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, allow_patterns=patterns + ["pytorch_model*.bin*"]))
    except Exception as err:  # huggingface_hub raises several error types (offline, 404, network)
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        raise LNFreeError(
            f"Cannot get {repo_id!r} from the Hugging Face Hub"
            + (" (HF_HUB_OFFLINE=1 and it is not in the local cache)" if offline else "")
            + f": {type(err).__name__}. Download it where the Hub is reachable "
            f"(`hf download {repo_id} --local-dir DIR`) and pass the local directory path instead."
        ) from err
    return path


def resolve(src: SourceLike) -> Source:
    """Resolve a Hub id / alias / local directory / in-memory ``GPT2LMHeadModel``.

    Raises:
        LNFreeError: unknown name, missing or corrupt files, non-GPT-2 architecture, Hub id not
            reachable or cached.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    inner = getattr(src, "_module", None)  # an nnsight model (load_nnsight): the HF model it wraps
    if not isinstance(src, torch.nn.Module) and isinstance(inner, GPT2LMHeadModel):
        src = inner
    if not isinstance(src, (str, os.PathLike, torch.nn.Module)):
        raise LNFreeError(f"Cannot load from a {type(src).__name__}: pass a Hub id or alias (see "
                          "list_checkpoints()), a checkpoint directory, or a transformers GPT2LMHeadModel.")
    if isinstance(src, torch.nn.Module):
        if not isinstance(src, GPT2LMHeadModel):
            raise LNFreeError(
                f"Got a {type(src).__name__}; pass a transformers GPT2LMHeadModel (or a Hub id or "
                "directory). lnfree_interp supports GPT-2 checkpoints only.")
        _check_config(src.config, "the model")
        eps = {}
        for name in ln_names(src.config.n_layer):
            module = src.get_submodule(name)
            eps[name] = float(getattr(module, "eps", src.config.layer_norm_epsilon))
        return Source("in-memory GPT2LMHeadModel", src.config, src.state_dict(keep_vars=False), eps,
                      owned=False)

    text = os.fspath(src)
    path = Path(text).expanduser()
    known = None
    if not path.exists():
        known = lookup(text)
        if known is not None and known.embedded:
            path = EMBEDDED_DIR / known.name
            if not path.exists():
                raise LNFreeError(f"The embedded model {known.name!r} is not installed at {path}; "
                                  "reinstall lnfree_interp or run scripts/build_tiny_models.py.")
        elif known is not None or re.fullmatch(r"[\w.\-]+/[\w.\-]+", text):
            path = _download(known.name if known else text)
        else:
            raise LNFreeError(
                f"{text!r} is not a directory, a known checkpoint name (see list_checkpoints()) or a "
                "Hub id of the form owner/name.")
    if not path.is_dir():
        raise LNFreeError(f"{path} is a file; pass the checkpoint directory (with config.json).")
    if not (path / "config.json").exists():
        raise LNFreeError(f"No config.json in {path}; is it a Hugging Face checkpoint directory?")
    try:
        config = GPT2Config.from_pretrained(str(path))
    except Exception as err:
        raw = json.loads((path / "config.json").read_text())
        raise LNFreeError(f"{path} holds a {raw.get('model_type', 'unknown')!r} model; lnfree_interp "
                          "supports GPT-2 (GPT2LMHeadModel) checkpoints only.") from err
    _check_config(config, str(path))
    weights = _LazyWeights(*_weight_files(path))
    eps = {name: float(config.layer_norm_epsilon) for name in ln_names(config.n_layer)}
    known = known or lookup(text)
    return Source(known.name if known else str(path), config, weights, eps, owned=True, directory=path,
                  known=known)


# --------------------------------------------------------------------------------------------
# inspect_checkpoint
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """What [`inspect_checkpoint`][lnfree_interp.inspect_checkpoint] found. ``encoding`` is one of:

    * ``"schaeff"`` - LN-free, every LN hacked (eps 1e12, weight gamma*1e6/s, bias beta);
    * ``"apollo"`` - LN-free, ``ln_1``/``ln_2`` weight exactly sqrt(eps) and bias 0, ``ln_f`` hacked;
    * ``"layernorm"`` - a standard GPT-2 with real LayerNorm (a baseline);
    * ``"folded"`` - saved by this library after folding (identity LNs).
    """

    source: str
    encoding: str
    lnfree: bool
    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    eps: float  #: config.layer_norm_epsilon
    ln_eps: Mapping[str, float]  #: eps of each LN module
    ln_weight_scale: Mapping[str, float]  #: median |weight| of each LN
    known: KnownCheckpoint | None = None

    def __str__(self) -> str:
        lines = [
            f"source      {self.source}",
            f"encoding    {self.encoding} ({'LN-free' if self.lnfree else 'with LayerNorm'})",
            f"sizes       n_layers={self.n_layers} n_heads={self.n_heads} d_model={self.d_model} "
            f"d_mlp={self.d_mlp} d_vocab={self.d_vocab} n_ctx={self.n_ctx}",
            f"eps         config {self.eps:g}; modules {sorted(set(self.ln_eps.values()))}",
        ]
        if self.ln_weight_scale:
            vals = list(self.ln_weight_scale.values())
            lines.append(f"LN weights  median|w| from {min(vals):.4g} to {max(vals):.4g} "
                         f"(gain w/sqrt(eps) from {min(vals) / math.sqrt(max(self.eps, 1e-30)):.3g})")
        if self.known:
            k = self.known
            losses = ", ".join(f"{d} {v:.4f}" for d, v in k.losses.items() if v is not None)
            lines.append(f"registry    {k.name}: {k.kind}, size {k.size}, base {k.base_model}, "
                         f"ft_steps {k.ft_steps}" + (f"; reported loss {losses}" if losses else ""))
        return "\n".join(lines)


def analyse_source(source: Source) -> tuple[str, list[LNState] | None]:
    """(encoding, classified LNs or None for folded) of a resolved source."""
    sd = source.state_dict
    marker = getattr(source.config, FOLDED_MARKER, None)
    has_ln = "transformer.ln_f.weight" in sd
    if not has_ln:
        if marker is None and "lm_head.bias" not in sd:
            raise LNFreeError(f"{source.label} has no LayerNorm weights (transformer.ln_f.weight) and is "
                              "not a checkpoint folded by lnfree_interp; the weight file is incomplete.")
        return "folded", None
    try:
        lns = classify_layernorms(sd, source.n_layers, source.module_eps)
    except KeyError as err:
        raise LNFreeError(f"{source.label} is missing weight {err.args[0]!r}; the checkpoint is incomplete "
                          "or not a GPT-2.") from err
    return detect_encoding(lns, sd), lns


def inspect_checkpoint(src: SourceLike) -> CheckpointInfo:
    """Detect a checkpoint's encoding and sizes without building a model.

    Reads ``config.json`` and the LayerNorm weights only.

    Args:
        src: Hub id or alias (see [`list_checkpoints`][lnfree_interp.list_checkpoints]), local directory, or in-memory
            ``GPT2LMHeadModel``.

    Returns:
        `CheckpointInfo` (encoding, sizes, eps values, per-LN weight scale, LN-free or not).

    Raises:
        LNFreeError: unreadable / non-GPT-2 / half-hacked checkpoints, Hub ids not cached offline.
    """
    source = resolve(src)
    try:
        encoding, lns = analyse_source(source)
        c = source.config
        return CheckpointInfo(
            source=source.label, encoding=encoding, lnfree=encoding != "layernorm",
            n_layers=c.n_layer, n_heads=c.n_head, d_model=c.n_embd, d_mlp=c.n_inner or 4 * c.n_embd,
            d_vocab=c.vocab_size, n_ctx=c.n_positions, eps=float(c.layer_norm_epsilon),
            ln_eps=dict(source.module_eps) if lns is not None else {},
            ln_weight_scale={ln.name: ln.weight_scale for ln in lns} if lns is not None else {},
            known=source.known,
        )
    finally:
        source.close()
