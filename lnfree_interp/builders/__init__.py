"""Model building: the folded weights as runnable models, one module per framework.

* `hf` - ``transformers.GPT2LMHeadModel`` with identity (or folded) LayerNorms, the float64
  reference the exactness checks compare against, dtype / device / config-variant helpers;
* `tl` - TransformerLens ``HookedTransformer`` (TL 3.x) and ``TransformerBridge``;
* `nnsight` - nnsight's ``TransformersModel`` over the HF model and ``UnifiedModel`` over a TL model.

The loaders (`loaders`) call these; the analysis adapters live in
[`backends`][lnfree_interp.backends].
"""
