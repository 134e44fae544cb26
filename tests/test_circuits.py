"""Edge attribution, edge patching, circuit evaluation (lnfree_interp.circuits) against independent references."""

import pytest
import torch

import lnfree_interp as L
from lnfree_interp import Edge, LNFreeError, Node, logit_diff
from lnfree_interp.graph import Graph

from .conftest import LOADERS, load

ANSWER, WRONG = [5, 17, 40], 9


def _pair(vocab, seq=10, batch=3):
    gen = torch.Generator().manual_seed(3)
    clean = torch.randint(0, vocab, (batch, seq), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 2:5] = torch.randint(0, vocab, (batch, 3), generator=gen)
    return clean, corrupted


def _brute_force_edge_count(n_layers, n_heads):
    """Count writer->reader pairs by walking the residual stream (no closed form)."""
    count = 0
    stream = 1  # embed
    for _layer in range(n_layers):
        count += 3 * n_heads * stream  # q, k, v of every head read everything written so far
        stream += n_heads
        count += stream  # the MLP reads the attention's writes too
        stream += 1
    return count + stream  # logits


@pytest.mark.parametrize("shape", [(1, 1), (2, 4), (4, 3), (12, 12), (48, 25)])
def test_edge_count(shape):
    assert L.n_edges(*shape) == _brute_force_edge_count(*shape) == Graph(*shape).n_edges


def test_gpt2_small_has_the_standard_edge_count():
    assert L.n_edges(12, 12) == 32491


def test_labels_round_trip_and_bad_labels():
    for label in ("embed", "L3H2", "3_mlp_out", "L3H2.q", "L0H1.k", "L2H0.v", "3_mlp_in", "logits"):
        assert Node.parse(label).label == label
    e = Edge.parse("L0H1->L1H2.k")
    assert e.label == "L0H1->L1H2.k" and Edge.parse((e.writer, e.reader)) == e
    for bad in ("L3H", "mlp", "L1H2.x", "3_attn", "7"):
        with pytest.raises(LNFreeError, match="Unknown node label"):
            Node.parse(bad)
    with pytest.raises(LNFreeError, match="comes after its reader"):
        Edge.parse("L1H0->L1H2.q")  # a layer's heads write after its attention reads
    with pytest.raises(LNFreeError, match="comes after its reader"):
        Edge.parse("1_mlp_out->1_mlp_in")
    Edge.parse("L1H0->1_mlp_in")  # the attention of layer l comes before its MLP
    with pytest.raises(LNFreeError, match="from a writer"):
        Edge.parse("L0H0.q->logits")
    with pytest.raises(LNFreeError, match="writer->reader"):
        Edge.parse("L0H0 to logits")


@pytest.mark.parametrize("encoding", ["schaeff", "layernorm"])
def test_eap_logit_edges_exact_and_node_sums_equal_atp(models, encoding):
    """LN-free: EAP into logits == edge patching (1e-10, float64). Always: sum of a writer's outgoing EAP
    edges == its attribution-patching node score (1e-10). Other edge classes: error measured, not asserted."""
    lnfree = encoding != "layernorm"
    model = L.load_hf(models[encoding], dtype=torch.float64, expect_lnfree=lnfree)
    clean, corrupted = _pair(models[encoding].config.vocab_size)
    metric = logit_diff(ANSWER, WRONG)
    eap = L.edge_attribution(model, clean, corrupted, metric)
    ep = L.edge_patching(model, clean, corrupted, metric, progress=False)
    assert [e.label for e in eap.edges] == [e.label for e in ep.edges] and len(eap.edges) == L.n_edges(2, 4)
    into_logits = [i for i, e in enumerate(eap.edges) if e.reader.kind == "logits"]
    err = (eap.values[into_logits] - ep.values[into_logits]).abs().max().item()
    assert ep.values[into_logits].abs().max() > 1e-3  # the edges matter
    if lnfree:
        assert err <= 1e-10
        assert {e.label for e in eap.exact_edges()} == {eap.edges[i].label for i in into_logits}
    else:
        assert err > 1e-6 and not eap.exact_edges()  # the final LayerNorm makes EAP an estimate
    # node sums: heads through hook_z, MLPs through hook_mlp_out, embed through resid_pre 0
    nodes = eap.node_scores()
    for kind, label_of in (("head", lambda lab: lab), ("mlp_out", lambda lab: lab)):
        atp = L.attribution_patching(model, clean, corrupted, metric, nodes=kind, per_position=False)
        for i, lab in enumerate(atp.labels):
            assert abs(nodes[label_of(lab)] - atp.values[i].mean().item()) <= 1e-10
    atp = L.attribution_patching(model, clean, corrupted, metric, nodes="resid_pre", per_position=False)
    assert abs(nodes["embed"] - atp.values[atp.labels.index("0_resid_pre")].mean().item()) <= 1e-10
    # EAP-IG with one step is EAP; with more steps its edges into the logits are still exact LN-free
    ig1 = L.edge_attribution(model, clean, corrupted, metric, method="eap-ig", steps=1)
    assert (ig1.values - eap.values).abs().max() <= 1e-10
    ig3 = L.edge_attribution(model, clean, corrupted, metric, method="eap-ig", steps=3)
    ig_err = (ig3.values[into_logits] - ep.values[into_logits]).abs().max().item()
    assert (ig_err <= 1e-10) == lnfree and bool(ig3.exact_edges()) == lnfree
    assert (ig3.values - eap.values).abs().max() > 1e-8  # the interpolation changes the other edges
    # per-position scores sum to the position-summed ones
    pp = L.edge_attribution(model, clean, corrupted, metric, per_position=True)
    assert (pp.values.sum(1) - eap.values).abs().max() <= 1e-10
    # a plain callable (not known to be linear) never claims exact edges, whatever the model; same numbers
    plain = L.edge_attribution(model, clean, corrupted, lambda lg: lg[:, -1, 5] - lg[:, -1, WRONG])
    assert not plain.exact_edges() and eap.extra["steps"] == 1
    assert (plain.values[:, 0] - eap.values[:, 0]).abs().max() <= 1e-10  # prompt 0's answer is 5
    # edge patching one prompt x edge per pass (batch_size 1) gives the same ground truth
    some = [e.label for e in ep.edges[::40]]
    one = L.edge_patching(model, clean, corrupted, metric, edges=some, batch_size=1, progress=False)
    assert (one.values - ep.values[::40]).abs().max() <= 1e-10


def test_edge_patching_matches_an_independent_patch(models):
    """One q edge patched by hand through HF hooks (the reader's input recomputed from the HF model's own
    modules) equals edge_patching's value."""
    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    metric = logit_diff(ANSWER, WRONG)
    edge = "L0H2->L1H1.q"
    got = L.edge_patching(model, clean, corrupted, metric, edges=[edge], progress=False).values[0]
    blocks = model.transformer.h
    H, d = 4, 64
    dh = d // H
    # writer L0H2's output on each input: z (input of c_proj) head 2 through c_proj's rows
    zs = {}
    def grab(name):
        def hook(mod, args):
            zs[name] = args[0].detach()
        return hook
    def head_out(tokens):
        h = blocks[0].attn.c_proj.register_forward_pre_hook(grab("z"))
        with torch.no_grad():
            model(tokens)
        h.remove()
        z = zs["z"][..., 2 * dh:3 * dh]
        return z @ blocks[0].attn.c_proj.weight[2 * dh:3 * dh]
    delta = head_out(corrupted) - head_out(clean)

    def patch(mod, args, out):
        q_new = (args[0] + delta) @ mod.weight[:, :d] + mod.bias[:d]  # ln_1 is the identity LN-free
        out = out.clone()
        out[..., 1 * dh:2 * dh] = q_new[..., 1 * dh:2 * dh]
        return out
    handle = blocks[1].attn.c_attn.register_forward_hook(patch)
    with torch.no_grad():
        patched = model(clean).logits
    handle.remove()
    with torch.no_grad():
        base = model(clean).logits
    ids = torch.tensor(ANSWER)
    rows = torch.arange(3)
    md = lambda lg: lg[rows, -1, ids] - lg[rows, -1, WRONG]  # noqa: E731
    assert (got - (md(patched) - md(base))).abs().max() <= 1e-10
    assert got.abs().max() > 1e-4


@pytest.mark.parametrize("encoding", ["schaeff", "layernorm"])
@pytest.mark.parametrize("ablation", ["corrupted", "mean"])
def test_full_and_empty_circuits(models, encoding, ablation):
    """The full graph gives the clean metric; the empty graph the corrupted one (float64, 1e-10)."""
    lnfree = encoding != "layernorm"
    model = L.load_hf(models[encoding], dtype=torch.float64, expect_lnfree=lnfree)
    clean, corrupted = _pair(models[encoding].config.vocab_size)
    metric = logit_diff(ANSWER, WRONG)
    graph = Graph(2, 4)
    full = L.evaluate_circuit(model, graph.edges, clean, corrupted, metric, ablation=ablation)
    empty = L.evaluate_circuit(model, [], clean, corrupted, metric, ablation=ablation)
    assert (full["metric"] - full["metric_clean"]).abs().max() <= 1e-10
    assert abs(full["faithfulness"] - 1) <= 1e-10 and abs(empty["faithfulness"]) <= 1e-10
    if ablation == "corrupted":
        with torch.no_grad():
            c_logits = model(corrupted).logits
        rows = torch.arange(3)
        m_corr = c_logits[rows, -1, torch.tensor(ANSWER)] - c_logits[rows, -1, WRONG]
        assert (empty["metric"] - m_corr).abs().max() <= 1e-10
    else:  # every reader's input is the mean of its writers: a hand rebuild of layer 0's MLP input
        assert (empty["metric"] - empty["metric_corrupted"]).abs().max() <= 1e-10
    # a circuit in between lies in between on a curve, and curves batch circuits
    eap = L.edge_attribution(model, clean, corrupted, metric)
    curve = L.faithfulness_curve(model, (eap, [0, 10, graph.n_edges]), clean, corrupted, metric,
                                 ablation=ablation, progress=False)
    assert curve["n_edges"] == [0, 10, graph.n_edges]
    assert abs(curve["faithfulness"][0]) <= 1e-10 and abs(curve["faithfulness"][-1] - 1) <= 1e-10
    one = L.evaluate_circuit(model, eap.top_edges(10), clean, corrupted, metric, ablation=ablation)
    assert (one["metric"] - curve["metrics"][1]).abs().max() <= 1e-10


@pytest.mark.parametrize("encoding", ["schaeff", "layernorm"])
def test_eap_ig_matches_a_hand_written_integral(models, encoding):
    """EAP-IG of a q edge and an MLP edge against integrated gradients by hand: HF ``inputs_embeds``
    interpolated between the corrupted and clean token embeddings (alpha = k/steps, k = 1..steps), the
    gradient at the reader's input taken from HF's own modules, pulled back through the LayerNorm module by
    autograd on the LN baseline (each step's own LayerNorm input) (float64, 1e-10)."""
    model = L.load_hf(models[encoding], dtype=torch.float64, expect_lnfree=encoding != "layernorm")
    clean, corrupted = _pair(models[encoding].config.vocab_size)
    metric = logit_diff(ANSWER, WRONG)
    steps, H, d = (4 if encoding == "schaeff" else 2), 4, 64  # 2: the LN baseline's mean over 2 kept runs
    dh = d // H
    got = L.edge_attribution(model, clean, corrupted, metric, method="eap-ig", steps=steps)
    assert got.extra["steps"] == steps and got.kind == "eap-ig"
    blocks, wte = model.transformer.h, model.transformer.wte.weight
    rows = torch.arange(3)

    def head_out(tokens):  # writer L0H2: its slice of z through c_proj (b_O is a constant writer)
        box = {}
        h = blocks[0].attn.c_proj.register_forward_pre_hook(lambda m, a: box.setdefault("z", a[0].detach()))
        with torch.no_grad():
            model(tokens)
        h.remove()
        return box["z"][..., 2 * dh:3 * dh] @ blocks[0].attn.c_proj.weight[2 * dh:3 * dh]

    def mlp_out(tokens):  # writer 0_mlp_out
        box = {}
        h = blocks[0].mlp.register_forward_hook(lambda m, a, o: box.setdefault("o", o.detach()))
        with torch.no_grad():
            model(tokens)
        h.remove()
        return box["o"]

    grads = {"q": 0, "mlp": 0}
    for k in range(1, steps + 1):
        emb = (wte[corrupted] + k / steps * (wte[clean] - wte[corrupted])).detach()
        box = {}
        hooks = [blocks[1].attn.c_attn.register_forward_hook(lambda m, a, o: box.update(qkv=o)),
                 blocks[1].mlp.register_forward_hook(lambda m, a, o: box.update(m=a[0])),
                 blocks[1].ln_1.register_forward_pre_hook(lambda m, a: box.update(r1=a[0].detach())),
                 blocks[1].ln_2.register_forward_pre_hook(lambda m, a: box.update(r2=a[0].detach()))]
        logits = model(inputs_embeds=emb).logits
        for h in hooks:
            h.remove()
        m = (logits[rows, -1, torch.tensor(ANSWER)] - logits[rows, -1, WRONG]).sum()
        g_qkv, g_m = torch.autograd.grad(m, [box["qkv"], box["m"]])
        # the reader L1H1.q sees its input only through head 1's query columns of c_attn
        g_q = g_qkv[..., dh:2 * dh] @ blocks[1].attn.c_attn.weight[:, dh:2 * dh].T
        grads["q"] = grads["q"] + _pull_back(blocks[1].ln_1, box["r1"], g_q) / steps
        grads["mlp"] = grads["mlp"] + _pull_back(blocks[1].ln_2, box["r2"], g_m) / steps
    want_q = ((head_out(corrupted) - head_out(clean)) * grads["q"]).sum((1, 2))
    want_m = ((mlp_out(corrupted) - mlp_out(clean)) * grads["mlp"]).sum((1, 2))
    labels = [e.label for e in got.edges]
    assert (got.values[labels.index("L0H2->L1H1.q")] - want_q).abs().max() <= 1e-10
    assert (got.values[labels.index("0_mlp_out->1_mlp_in")] - want_m).abs().max() <= 1e-10
    assert want_q.abs().max() > 1e-6 and want_m.abs().max() > 1e-6


def _pull_back(ln, x, grad_out):
    """d/dx of grad_out . ln(x) by autograd through the model's own LayerNorm module (identity LN-free)."""
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(ln(x), x, grad_outputs=grad_out)[0]


def _manual_circuit_metric(hf, graph, on, clean, corrupted, ablation="corrupted"):
    """An independent circuit evaluation: a hand-written float64 GPT-2 forward (every reader's input is the
    normalisation - LN-free the identity, else a folded LayerNorm - of the constant biases plus the sum of its
    writers' outputs) from the HF modules' own weights. Reader r takes writer w's running output if ``on[w, r]``
    else its output in the corrupted run."""
    t = hf.transformer
    H, d = hf.config.n_head, hf.config.n_embd
    dh = d // H
    lnfree = isinstance(t.ln_f, torch.nn.Identity)

    def norm(x):
        return x if lnfree else torch.nn.functional.layer_norm(x, (d,), eps=hf.config.layer_norm_epsilon)

    def forward(tokens, ablated=None):
        B, P = tokens.shape
        outs = [t.wte.weight[tokens] + t.wpe.weight[:P]]
        const = torch.zeros(d, dtype=torch.float64)

        def read(ri):
            ws = range(len(outs))
            full = torch.zeros(B, P, d, dtype=torch.float64) + const  # mean-ablated writers broadcast over [B, P]
            return norm(full + sum(outs[w] if ablated is None or on[w, ri] else ablated[w] for w in ws))

        causal = torch.ones(P, P).tril().bool()
        for layer, blk in enumerate(t.h):
            start = graph.reader_start(layer)
            Wa, ba = blk.attn.c_attn.weight, blk.attn.c_attn.bias
            heads = []
            for h in range(H):
                q, k, v = ((read(start + j * H + h) @ Wa[:, j * d:(j + 1) * d] + ba[j * d:(j + 1) * d])
                           [..., h * dh:(h + 1) * dh] for j in range(3))
                scores = (q @ k.transpose(-1, -2) / dh**0.5).masked_fill(~causal, float("-inf"))
                z = scores.softmax(-1) @ v
                heads.append(z @ blk.attn.c_proj.weight[h * dh:(h + 1) * dh])
            outs += heads
            const = const + blk.attn.c_proj.bias
            x = read(start + 3 * H)
            hidden = torch.nn.functional.gelu(x @ blk.mlp.c_fc.weight + blk.mlp.c_fc.bias, approximate="tanh")
            outs.append(hidden @ blk.mlp.c_proj.weight)
            const = const + blk.mlp.c_proj.bias
        logits = hf.lm_head(read(len(graph.readers) - 1))
        return logits, outs

    with torch.no_grad():
        if ablation == "mean":
            _, clean_outs = forward(clean)
            ablated = [o.mean((0, 1), keepdim=True) for o in clean_outs]
        else:
            _, ablated = forward(corrupted)
        logits, _ = forward(clean, ablated=ablated)
    rows = torch.arange(clean.shape[0])
    return logits[rows, -1, torch.tensor(ANSWER)] - logits[rows, -1, WRONG]


@pytest.mark.parametrize("encoding", ["schaeff", "layernorm"])
def test_partial_circuits_match_a_hand_written_forward(models, encoding):
    """Sparse, middling and near-full circuits (each takes another path of the rebuild) against
    `_manual_circuit_metric` (float64, 1e-10), LN-free and on the LN baseline."""
    hf = L.load_hf(models[encoding], dtype=torch.float64, expect_lnfree=encoding != "layernorm")
    assert isinstance(hf.transformer.ln_f, torch.nn.Identity) == (encoding != "layernorm")
    clean, corrupted = _pair(models[encoding].config.vocab_size)
    metric = logit_diff(ANSWER, WRONG)
    graph = Graph(2, 4)
    eap = L.edge_attribution(hf, clean, corrupted, metric)
    gen = torch.Generator().manual_seed(0)
    near_full = [e for e in graph.edges if torch.rand(1, generator=gen) > 0.05]
    circuits = [eap.top_edges(5), eap.top_edges(40), eap.top_edges(graph.n_edges // 2), near_full]
    for ablation, batch_size in (("corrupted", 64), ("mean", 1)):  # batch_size 1: one prompt x circuit per pass
        curve = L.faithfulness_curve(hf, circuits, clean, corrupted, metric, ablation=ablation, batch_size=batch_size,
                                     progress=False)
        for circuit, got in zip(circuits, curve["metrics"]):
            want = _manual_circuit_metric(hf, graph, graph.mask(circuit), clean, corrupted, ablation)
            assert (got - want).abs().max() <= 1e-10, (ablation, len(circuit))
        assert len({round(float(m.mean()), 6) for m in curve["metrics"]}) == 4  # four different answers


@pytest.mark.parametrize("loader", LOADERS)
def test_every_backend_gives_the_same_scores(models, loader):
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    metric = logit_diff(ANSWER, WRONG)
    ref = L.edge_attribution(L.load_hf(models["schaeff"], dtype=torch.float64), clean, corrupted, metric)
    model = load(loader, models["schaeff"], dtype=torch.float64)
    got = L.edge_attribution(model, clean, corrupted, metric)
    assert (got.values - ref.values).abs().max() <= 1e-10
    circuit = ref.top_edges(8)
    a = L.evaluate_circuit(model, circuit, clean, corrupted, metric)["metric"]
    b = L.evaluate_circuit(L.load_hf(models["schaeff"], dtype=torch.float64), circuit, clean, corrupted, metric)
    assert (a - b["metric"]).abs().max() <= 1e-10
    few = [e.label for e in circuit[:3]]
    ep = L.edge_patching(model, clean, corrupted, metric, edges=few, progress=False)
    ep_ref = L.edge_patching(L.load_hf(models["schaeff"], dtype=torch.float64), clean, corrupted, metric, edges=few,
                             progress=False)
    assert (ep.values - ep_ref.values).abs().max() <= 1e-10


def test_result_tables_and_figures(models, tmp_path):
    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    eap = L.edge_attribution(model, clean, corrupted, logit_diff(ANSWER, WRONG))
    df = eap.to_dataframe()
    assert len(df) == L.n_edges(2, 4) and set(df["reader_kind"]) == {"q", "k", "v", "mlp_in", "logits"}
    top = eap.top(5)
    assert list(top["abs_mean"]) == sorted(df["abs_mean"], reverse=True)[:5]
    assert eap[top["edge"][0]].shape == (3,)
    files = eap.save(tmp_path / "edges", k=20)
    assert all(f.exists() and f.stat().st_size > 1000 for f in files)
    assert "cdn" not in files[1].read_text()[:5000].lower()


def test_bad_input(models):
    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    metric = logit_diff(ANSWER, WRONG)
    with pytest.raises(LNFreeError, match="steps"):
        L.edge_attribution(model, clean, corrupted, metric, method="eap-ig", steps=0)
    with pytest.raises(LNFreeError, match="method"):
        L.edge_attribution(model, clean, corrupted, metric, method="acdc")
    with pytest.raises(LNFreeError, match="different shapes"):
        L.edge_attribution(model, clean, corrupted[:, :-1], metric)
    with pytest.raises(LNFreeError, match="one scalar per prompt"):
        L.edge_attribution(model, clean, corrupted, lambda logits: logits.sum())
    with pytest.raises(LNFreeError, match="Unknown node label"):
        L.edge_patching(model, clean, corrupted, metric, edges=["L0X1->logits"])
    with pytest.raises(LNFreeError, match="another model"):
        L.evaluate_circuit(model, ["L5H0->logits"], clean, corrupted, metric)  # a 2-layer model has no layer 5
    with pytest.raises(LNFreeError, match="comes after"):
        L.evaluate_circuit(model, ["1_mlp_out->L1H0.k"], clean, corrupted, metric)
    with pytest.raises(LNFreeError, match="ablation"):
        L.evaluate_circuit(model, [], clean, corrupted, metric, ablation="zero")
    with pytest.raises(LNFreeError, match="batch_size"):
        L.edge_patching(model, clean, corrupted, metric, batch_size=0)
    # hooks removed and flags untouched after an exception inside the forward pass
    model.train()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    def boom(logits):
        raise RuntimeError("metric failed")
    with pytest.raises(RuntimeError, match="metric failed"):
        L.edge_attribution(model, clean, corrupted, boom)
    assert model.training and all(m.training for m in model.modules())
    assert hooks == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert before == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


def test_compare_attribution_on_edges(models):
    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    metric = logit_diff(ANSWER, WRONG)
    eap = L.edge_attribution(model, clean, corrupted, metric)
    ep = L.edge_patching(model, clean, corrupted, metric, progress=False)
    cmp = L.compare_attribution(eap, ep)
    per = cmp.per_component.set_index("reader")
    assert set(per.index) == {"logits", "q", "k", "v", "mlp_in"}
    assert per.loc["logits", "max_abs_error"] <= 1e-10 and per.loc["logits", "edges"] == 1 + 2 * (4 + 1)
    idx = [i for i, e in enumerate(ep.edges) if e.reader.kind == "k"]
    assert per.loc["k", "max_abs_error"] == pytest.approx((eap.values[idx] - ep.values[idx]).abs().max().item())
    with pytest.raises(LNFreeError, match="first"):
        L.compare_attribution(ep, eap)


@pytest.mark.parametrize("loader", LOADERS)
def test_reader_inputs_are_the_sum_of_their_writers(models, loader):
    """LN-free: every reader's input (resid_pre of a layer for q/k/v, resid_mid for the MLP, the final residual
    for the logits) is exactly the sum of the writers before it plus the constant attention biases (1e-10)."""
    from lnfree_interp.backends import get_backend
    from lnfree_interp.graph import writer_hooks, writer_outputs

    backend = get_backend(load(loader, models["schaeff"], dtype=torch.float64))
    tokens, _ = _pair(models["schaeff"].config.vocab_size)
    L_ = backend.n_layers
    names = writer_hooks(L_) + [f"blocks.{x}.hook_resid_{s}" for x in range(L_) for s in ("pre", "mid", "post")]
    acts = backend.run(tokens, None, capture=names).acts
    outs = writer_outputs(backend, acts).transpose(0, 1)  # [W, B, P, d] in graph order
    w, H = backend.weights(), backend.n_heads
    total = outs[0].clone()
    for layer in range(L_):
        assert (total - acts[f"blocks.{layer}.hook_resid_pre"]).abs().max() <= 1e-10
        first = 1 + layer * (H + 1)
        total = total + outs[first:first + H].sum(0) + w.b_O[layer]
        assert (total - acts[f"blocks.{layer}.hook_resid_mid"]).abs().max() <= 1e-10
        total = total + outs[first + H]
        assert (total - acts[f"blocks.{layer}.hook_resid_post"]).abs().max() <= 1e-10


def test_more_bad_input_found_by_a_new_user(models):
    from torch.utils.data import DataLoader

    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    metric = logit_diff(ANSWER, WRONG)
    with pytest.raises(LNFreeError, match="at least one edge"):
        L.edge_patching(model, clean, corrupted, metric, edges=[])
    with pytest.raises(LNFreeError, match="more than once"):
        L.edge_patching(model, clean, corrupted, metric, edges=["L0H0->logits", "L0H0->logits"])
    one = L.edge_patching(model, clean, corrupted, metric, edges="L0H0->logits", progress=False)  # a bare label
    assert [e.label for e in one.edges] == ["L0H0->logits"]
    eap = L.edge_attribution(model, clean, corrupted, metric)
    with pytest.raises(LNFreeError, match="top_edges"):
        L.evaluate_circuit(model, eap, clean, corrupted, metric)
    with pytest.raises(LNFreeError, match="non-negative"):
        eap.top(-1)
    with pytest.raises(LNFreeError, match="DataLoader"):
        L.evaluate_circuit(model, [], DataLoader(list(zip(clean, corrupted)), batch_size=2), None, metric)
    with pytest.raises(LNFreeError, match="corrupted=None"):
        L.edge_attribution(model, DataLoader(list(zip(clean, corrupted)), batch_size=2), corrupted, metric,
                           progress=False)
    with pytest.warns(UserWarning, match="barely differ"):
        same = L.evaluate_circuit(model, [], clean, clean, metric)
    assert same["faithfulness"] != same["faithfulness"]  # nan: clean == corrupted
    att = L.attention_scores(model, clean, "L1H0", query_pos=-1)
    assert att.at([0, 1, 2]).shape[-1] == 3
    with pytest.raises(LNFreeError, match="key_pos"):
        att.at(999)


def test_bad_circuits_and_metrics_found_by_a_new_user(models):
    """Inputs a fresh user tried (session of 2026-12-02) that raised raw TypeErrors or misleading messages."""
    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    metric = logit_diff(ANSWER, WRONG)
    with pytest.raises(LNFreeError, match="got None"):
        L.evaluate_circuit(model, None, clean, corrupted, metric)
    with pytest.raises(LNFreeError, match="list of circuits"):
        L.faithfulness_curve(model, None, clean, corrupted, metric, progress=False)
    with pytest.raises(LNFreeError, match="boolean"):
        L.evaluate_circuit(model, torch.ones(Graph(2, 4).valid.shape), clean, corrupted, metric)
    # found by a new user (2026-12-03): raw TypeErrors before
    eap = L.edge_attribution(model, clean, corrupted, metric)
    with pytest.raises(LNFreeError, match="list of edges"):
        L.evaluate_circuit(model, L.Edge.parse("L1H1->logits"), clean, corrupted, metric)
    with pytest.raises(LNFreeError, match=r"wrap it: \[edges\]"):
        L.faithfulness_curve(model, eap.top_edges(5), clean, corrupted, metric, progress=False)
    with pytest.raises(LNFreeError, match="list of sizes"):
        L.faithfulness_curve(model, (eap, 10), clean, corrupted, metric, progress=False)
    for shape in ((-1, 2), (0, 0), (2, 0)):
        with pytest.raises(LNFreeError, match="at least one layer"):
            L.n_edges(*shape)
    with pytest.raises(LNFreeError, match="the metric itself is NaN"):
        L.edge_attribution(model, clean, corrupted, lambda lg: lg[:, -1, 0] * float("nan"))


def test_circuits_as_boolean_masks_batch_size_and_padded_mean_ablation(models):
    """A boolean [writers, readers] mask is the same circuit as its edge list (invalid entries dropped); a mask of
    another shape, and batch_size < 1 or not an int, are refused; mean ablation averages each writer over the
    real tokens only (checked against a hand mean on a padded batch)."""
    from lnfree_interp.backends import get_backend
    from lnfree_interp.faithfulness import _Ablated

    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    clean, corrupted = _pair(models["schaeff"].config.vocab_size)
    metric = logit_diff(ANSWER, WRONG)
    graph = Graph(2, 4)
    edges = L.edge_attribution(model, clean, corrupted, metric).top_edges(12)
    by_list = L.evaluate_circuit(model, edges, clean, corrupted, metric)["metric"]
    by_mask = L.evaluate_circuit(model, graph.mask(edges) | ~graph.valid, clean, corrupted, metric)["metric"]
    assert torch.equal(by_list, by_mask)
    with pytest.raises(LNFreeError, match=r"\[writers, readers\]"):
        L.evaluate_circuit(model, torch.ones(3, 3, dtype=torch.bool), clean, corrupted, metric)
    for bad in (0, "8", True):
        with pytest.raises(LNFreeError, match="batch_size"):
            L.evaluate_circuit(model, edges, clean, corrupted, metric, batch_size=bad)

    backend = get_backend(model)
    mask = torch.ones_like(clean)
    mask[0, 8:] = 0  # prompt 0 has 8 real tokens (right padding)
    names = _Ablated.hooks(2)
    acts = backend.run(clean, mask, capture=names).acts
    mean = _Ablated(backend, acts, weight=mask)
    real = mask.bool()
    embed = (acts["hook_embed"] + acts["hook_pos_embed"])[real].mean(0)
    assert (mean.embed.reshape(-1) - embed).abs().max() <= 1e-12
    assert (mean.mlp[1].reshape(-1) - acts["blocks.1.hook_mlp_out"][real].mean(0)).abs().max() <= 1e-12
    head = acts["blocks.1.attn.hook_z"][..., 2, :] @ backend.weights().W_O[1][2]
    assert (mean.one(1 + 5 + 2).reshape(-1) - head[real].mean(0)).abs().max() <= 1e-12  # L1H2: writer 1 + 5 + 2
    assert (mean.one(1 + 5 + 2).reshape(-1) - head.mean((0, 1))).abs().max() > 1e-6  # padding would change it


def test_eap_on_padded_pairs_equals_each_prompt_alone(models):
    """Right-padded pairs whose padding differs between clean and corrupted: each prompt's EAP scores equal those
    of that prompt alone, unpadded (float64, 1e-10); padding never contributes (nor turns into NaN)."""
    model = L.load_hf(models["schaeff"], dtype=torch.float64)
    vocab = models["schaeff"].config.vocab_size
    clean, corrupted = _pair(vocab)
    mask = torch.ones_like(clean)
    mask[0, 8:] = 0
    corrupted[0, 8:] = (clean[0, 8:] + 1) % vocab  # junk after the end differs between the two
    for method in ("eap", "eap-ig"):
        both = L.edge_attribution(model, clean, corrupted, logit_diff(ANSWER, WRONG), method=method, steps=2,
                                  attention_mask=mask, corrupted_attention_mask=mask)
        assert bool(torch.isfinite(both.values).all())
        for b, n in ((0, 8), (1, 12)):
            alone = L.edge_attribution(model, clean[b:b + 1, :n], corrupted[b:b + 1, :n],
                                       logit_diff(ANSWER[b], WRONG), method=method, steps=2)
            assert (both.values[:, b] - alone.values[:, 0]).abs().max() <= 1e-10, (method, b)
