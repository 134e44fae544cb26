"""Entropy (confidence-regulation) neurons of the last MLP layer.

Entropy neurons (Stolfo et al. 2024, "Confidence regulation neurons"; Gurnee et al. 2024) have a large
output weight that writes into the *effective null space* of the unembedding: the directions that
``W_U`` barely maps to logits. With a final LayerNorm such a write still changes every logit, because
it grows the residual norm and so shrinks the LN scale (a temperature); without LayerNorm its direct
effect is just its (tiny) projection through ``W_U``, and exactly zero for a write into the exact
null space. The paper (arXiv 2507.02559, section 5) shows GPT-2 small's neuron L11N584 changes the
entropy by a median |dH| ~ 0.05 nats with LN and ~ 0 LN-free (the authors'
``mech_interp/entropy_neurons/``: ``svd_comparison.py`` scores neurons, ``ablate_all_models.py``
mean-ablates them through the final LayerNorm and unembedding).

The unembedding is analysed as the map the final residual stream goes through: ``C W_U`` with ``C``
the centring (LN models centre before ``W_U``; in folded LN-free models the centring is already in
``W_U``). Its one exactly-null direction is the all-ones vector (removed by the centring); the
*effective null space* is the ``k_null`` next-smallest singular directions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..backends import Backend, eval_mode, get_backend
from ..errors import LNFreeError
from .windows import batches, token_windows

#: entropy neurons ablated when none are named
DEFAULT_TOP = 5


def default_k_null(d_model: int) -> int:
    """Size of the effective null space used by default: ``max(1, d_model // 64)`` (12 for GPT-2
    small's 768). A choice, not the paper's: pass ``k_null`` to change it."""
    return max(1, d_model // 64)


#: singular values at or below this fraction of the largest are exactly null (rounding only)
EXACT_NULL_RTOL = 1e-5


def unembedding_spectrum(model: Any) -> tuple[Float[Tensor, "d_model"], Float[Tensor, "d_model d_model"]]:
    """Singular values (ascending) and the matching residual-stream directions of the unembedding as
    the final residual stream sees it, in float64: ``C W_U`` for LN models (``ln_f`` centres first),
    ``W_U`` for LN-free ones (folded: the centring is inside ``W_U``).

    Returns:
        ``(S [d_model], U [d_model, d_model])`` with ``U[:, i]`` the unit direction of singular value
        ``S[i]``. For centred unembeddings ``S[0]`` ~ 0 (at most ~1e-8 of the largest, the
        resolution of the Gram-matrix route) belongs to the all-ones direction.
    """
    backend = get_backend(model)
    W_U = backend.weights().W_U.detach().double().cpu()
    W_eff = W_U if backend.lnfree else W_U - W_U.mean(0, keepdim=True)
    # eigendecomposition of the d_model x d_model Gram matrix (ascending): the same directions as the
    # SVD at a fraction of its cost; singular values below ~1e-8 of the largest read as ~1e-8
    evals, U = torch.linalg.eigh(W_eff @ W_eff.T)
    return evals.clamp_min(0).sqrt(), U


def _split(model: Any, k_null: int | None) -> tuple[Tensor, Tensor, int]:
    """(exact-null basis [d, e], effective-null basis [d, k], k) of the unembedding."""
    backend = get_backend(model)
    S, U = unembedding_spectrum(backend)
    n_exact = int((S <= EXACT_NULL_RTOL * S.max()).sum())
    k = default_k_null(backend.d_model) if k_null is None else k_null
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= backend.d_model - n_exact:
        raise LNFreeError(f"k_null={k_null} must be an integer in [1, {backend.d_model - n_exact}] (d_model "
                          f"{backend.d_model} minus {n_exact} exactly-null direction(s)).")
    return U[:, :n_exact], U[:, n_exact : n_exact + k], k


def null_space(model: Any, k_null: int | None = None, *, exact: bool = False) -> Float[Tensor, "d_model k"]:
    """Orthonormal basis of the unembedding's null space, float64.

    Args:
        model: any loaded model.
        k_null: size of the *effective* null space: the ``k_null`` smallest singular directions
            above the exactly-null ones (default `default_k_null`).
        exact: return the *exactly* null directions instead (singular value at most
            ``EXACT_NULL_RTOL`` of the largest; for centred unembeddings the all-ones direction):
            a write there has no direct effect on any logit.

    Returns:
        ``[d_model, k]`` with orthonormal columns.

    Raises:
        LNFreeError: ``k_null`` outside ``[1, d_model - n_exact]``.
    """
    exact_basis, effective, _ = _split(model, k_null)
    return exact_basis if exact else effective


def entropy_neuron_scores(model: Any, *, k_null: int | None = None):
    """Score every last-layer MLP neuron as an entropy-neuron candidate, from weights alone.

    Args:
        model: anything the loaders return; any backend.
        k_null: dimension of the effective null space (default `default_k_null`).

    Returns:
        ``pandas.DataFrame`` sorted by ``null_norm`` (descending), one row per neuron: ``neuron``
        (``L{l}N{n}``), ``index``, ``w_out_norm`` (``||W_out[n]||``), ``null_fraction`` (share of
        ``||W_out[n]||^2``, its exactly-null part left out, in the effective null space, 0-1), ``null_norm``
        (``||P_null W_out[n]||``, the ranking score), ``logit_var`` (the authors' ranking statistic:
        variance over the vocabulary of the cosine similarity between ``W_out[n]`` and each
        ``W_U`` column; small for entropy neurons).

    Raises:
        LNFreeError: bad ``k_null``.
    """
    import pandas as pd

    backend = get_backend(model)
    layer = backend.n_layers - 1
    W_out = backend.weights().W_out[layer].detach().double().cpu()  # [d_mlp, d_model]
    exact_basis, basis, _ = _split(backend, k_null)
    null2 = (W_out @ basis).pow(2).sum(-1)
    seen2 = W_out.pow(2).sum(-1) - (W_out @ exact_basis).pow(2).sum(-1)  # the part W_U does not discard
    W_U = backend.weights().W_U.detach().double().cpu()
    cos = (W_out / W_out.norm(dim=-1, keepdim=True).clamp_min(1e-300)) @ (W_U / W_U.norm(dim=0).clamp_min(1e-300))
    frame = pd.DataFrame({
        "neuron": [f"L{layer}N{n}" for n in range(backend.d_mlp)], "index": range(backend.d_mlp),
        "w_out_norm": W_out.norm(dim=-1).tolist(),
        "null_fraction": (null2 / seen2.clamp_min(1e-300)).tolist(),
        "null_norm": null2.sqrt().tolist(), "logit_var": cos.var(-1).tolist()})
    return frame.sort_values("null_norm", ascending=False, kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class NeuronAblation:
    """Effect of mean-ablating single last-layer neurons on the next-token distribution.

    Attributes:
        table: ``pandas.DataFrame``, one row per neuron: ``neuron``, ``index``, ``median_abs_dH``,
            ``mean_abs_dH``, ``mean_dH`` (entropy change, nats; ablated minus clean),
            ``median_abs_dCE``, ``mean_dCE`` (cross-entropy change, nats).
        clean_entropy: mean entropy of the unablated model (nats).
        clean_ce: mean cross-entropy of the unablated model (nats).
        n_tokens: scored tokens.
        per_token: ``dH`` and ``dCE`` ``[neuron, n]`` (when asked for).
    """

    table: Any
    clean_entropy: float
    clean_ce: float
    n_tokens: int
    per_token: dict[str, Tensor] = field(default_factory=dict, repr=False)


def _scale(backend: Backend, sq_norm: Tensor, d_model: int) -> Tensor:
    """``ln_f``'s scale ``sqrt(|C r|^2 / d_model + eps)`` from ``|C r|^2`` (1 when LN-free)."""
    if backend.lnfree:
        return torch.ones_like(sq_norm)
    return (sq_norm / d_model + backend.eps).sqrt()


def _entropy_ce(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1), -logp.gather(-1, target[:, None])[:, 0]


def neuron_ablation(
    model: Any,
    text: str | Int[Tensor, "n"],
    neurons: int | list[int] | None = None,
    *,
    top: int = DEFAULT_TOP,
    k_null: int | None = None,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    chunk_tokens: int = 256,
    return_per_token: bool = False,
    progress: bool = True,
) -> NeuronAblation:
    """Mean-ablate last-layer MLP neurons one at a time; per-token change in entropy and cross-entropy.

    A neuron's activation (``blocks.{L-1}.mlp.hook_post``) is replaced by its mean over the scored
    tokens; its only path to the logits is the direct one, so the ablated logits are recomputed from
    the captured final residual stream (``r + (mean - a) W_out[n]``, then ``ln_f`` and ``W_U``): one
    forward pass for all neurons, as in the authors' ``ablate_all_models.py``.

    Args:
        model: anything the loaders return (LN baselines included); any backend.
        text: a string or 1-D token ids, cut into windows as `token_windows` does.
        neurons: last-layer neuron indices; default the ``top`` neurons of
            [`entropy_neuron_scores`][lnfree_interp.entropy_neuron_scores] (largest write into the null space).
        top: how many neurons to take when ``neurons`` is ``None``.
        k_null: null-space dimension for choosing neurons (see `entropy_neuron_scores`).
        seq_len: window length (default ``min(512, n_ctx)``).
        max_tokens: use only the first ``max_tokens`` tokens.
        batch_size: windows per forward pass (default: logits of a batch under ~4M numbers).
        chunk_tokens: tokens per unembedding step (memory: ``chunk_tokens x d_vocab`` float64).
        return_per_token: keep ``dH`` and ``dCE`` ``[neuron, n]``.
        progress: tqdm bar over batches.

    Returns:
        `NeuronAblation` (nats).

    Raises:
        LNFreeError: neuron indices outside ``[0, d_mlp)``, an empty list, ``top < 1``, a text
            shorter than one window.
    """
    import pandas as pd

    backend = get_backend(model)
    layer = backend.n_layers - 1
    if neurons is None:
        if int(top) < 1:
            raise LNFreeError(f"top={top} must be at least 1.")
        neurons = entropy_neuron_scores(backend, k_null=k_null)["index"].tolist()[: int(top)]
    idx = [neurons] if isinstance(neurons, int) else list(neurons)
    if not idx:
        raise LNFreeError("neurons=[] is empty; pass neuron indices or None for the top entropy-neuron candidates.")
    if any(isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < backend.d_mlp for n in idx):
        raise LNFreeError(f"Neuron indices {idx} must be integers in [0, d_mlp = {backend.d_mlp}) of the last "
                          f"MLP layer ({layer}).")
    windows = token_windows(backend, text, seq_len=seq_len, max_tokens=max_tokens)
    resid_name, post_name = f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.mlp.hook_post"
    store: dict[str, list[Tensor]] = {"r": [], "a": [], "t": []}
    cols = torch.tensor(idx)

    def keep(key: str):
        def fn(act: Tensor) -> None:
            act = act.detach()[:, :-1].double()
            store[key].append((act[..., cols.to(act.device)] if key == "a" else act).flatten(0, 1).cpu())
        return fn

    with torch.no_grad(), eval_mode(backend):
        for x in batches(windows, batch_size, "neuron ablation", progress, backend.d_vocab):
            with backend.hooks({resid_name: keep("r"), post_name: keep("a")}):
                backend.forward(x, None)
            store["t"].append(x[:, 1:].flatten().cpu())
    r, a, target = torch.cat(store["r"]), torch.cat(store["a"]), torch.cat(store["t"])
    w = backend.weights()
    W_U, b_U = w.W_U.detach().double().cpu(), w.b_U.detach().double().cpu()
    W_n = w.W_out[layer].detach().double().cpu()[cols]  # [k, d_model]
    shift = a.mean(0) - a  # [n, k]: mean ablation moves r by shift * W_out[n]
    # LN: ln_f centres, so work with centred vectors. Ablated logits (r + s w) -> ((z + s g) / scale')
    # + b_U with z = C r W_U, g = C w W_U (no C and scale 1 when LN-free), and the
    # LN scale recomputed from |C r + s C w|^2: no per-neuron matmul with W_U.
    d = backend.d_model
    cr, cw = (r, W_n) if backend.lnfree else (r - r.mean(-1, keepdim=True), W_n - W_n.mean(-1, keepdim=True))
    g = cw @ W_U  # [k, V]
    cr2, dots, cw2 = cr.pow(2).sum(-1), cr @ cw.T, cw.pow(2).sum(-1)  # [n], [n, k], [k]
    dH = torch.empty(len(idx), r.shape[0], dtype=torch.float64)
    dCE = torch.empty_like(dH)
    H0, CE0 = torch.empty(r.shape[0], dtype=torch.float64), torch.empty(r.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, r.shape[0], int(chunk_tokens)):
            sl = slice(s, s + int(chunk_tokens))
            z = cr[sl] @ W_U
            H0[sl], CE0[sl] = _entropy_ce(z / _scale(backend, cr2[sl], d)[:, None] + b_U, target[sl])
            for j in range(len(idx)):
                sj = shift[sl, j]
                scale = _scale(backend, cr2[sl] + 2 * sj * dots[sl, j] + sj.pow(2) * cw2[j], d)
                h, ce = _entropy_ce((z + sj[:, None] * g[j]) / scale[:, None] + b_U, target[sl])
                dH[j, sl], dCE[j, sl] = h - H0[sl], ce - CE0[sl]
    table = pd.DataFrame({
        "neuron": [f"L{layer}N{n}" for n in idx], "index": idx,
        "median_abs_dH": dH.abs().median(-1).values.tolist(), "mean_abs_dH": dH.abs().mean(-1).tolist(),
        "mean_dH": dH.mean(-1).tolist(), "median_abs_dCE": dCE.abs().median(-1).values.tolist(),
        "mean_dCE": dCE.mean(-1).tolist()})
    return NeuronAblation(table=table, clean_entropy=float(H0.mean()), clean_ce=float(CE0.mean()),
                          n_tokens=r.shape[0], per_token={"dH": dH, "dCE": dCE} if return_per_token else {})
