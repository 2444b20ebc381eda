"""Specs of Hugging Face transformers from state-dict names and shapes (and config.json).

Families: ``gpt2`` (Conv1D weights stored (in, out); fused ``c_attn`` = q | k | v), ``llama``
(LLaMA / Mistral / Qwen naming: RMSNorm, gate/up/down MLP, rotary embeddings, grouped-query
attention), ``bert`` (post-LN encoder, token-type and position embeddings, pooler, MLM head) and
``vit`` (patch-embedding conv, cls token, position embeddings).

What moves (see docs/architectures.md):
- ``residual``: the residual stream of the whole network: embeddings' feature axis, every norm,
  every block's input and output projections, the final norm and the (tied or untied) LM head.
- ``layers.N.mlp``: the MLP hidden units of layer N.
- ``layers.N.attn.qk`` and ``layers.N.attn.vo``: attention, tied as whole heads (q, k, v and o
  of a head move together). Within a head, v/o dims move freely; q/k dims move jointly only where
  no rotary embedding is used. With grouped-query attention the groups are ``layers.N.attn.kv``
  (k and v rows) and ``layers.N.attn.q`` (query heads, with o's columns): a kv head moves with its
  group of query heads, query heads reorder within their group, and dims within heads stay fixed.
Attention stays fixed (with a note) when the head count is unknown: no config.json beside the
weights. Pooler outputs, which are model outputs, stay fixed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from rebasin.spec.core import Axis, AxisEntry, Heads, PermutationSpec
from rebasin.spec.registry import Config, NotThisFamily, Shapes, register_spec

RES = "residual"


class _Builder:
    """Collects axis entries for one family and checks that every tensor is accounted for."""

    def __init__(self, shapes: Shapes, family: str):
        self.shapes = shapes
        self.family = family
        self.axes: dict[str, list[AxisEntry]] = {}
        self.sizes: dict[str, int] = {}
        self.heads: dict[str, Heads] = {}
        self.notes: list[str] = []
        self.needs_config = False
        """Whether attention was left fixed for want of a config.json (its head count)."""
        self.fixed: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.shapes

    def group(self, name: str, size: int) -> str:
        if self.sizes.setdefault(name, size) != size:
            raise NotThisFamily(f"group '{name}' would have sizes {self.sizes[name]} and {size}")
        return name

    def set(self, name: str, *entries: AxisEntry) -> None:
        """Entries for an existing tensor (absent tensors are skipped: optional biases etc.)."""
        if name in self.shapes:
            self.axes[name] = list(entries)

    def linear(self, prefix: str, out: AxisEntry, inp: AxisEntry, conv1d: bool = False) -> None:
        """``prefix.weight`` (out, in) — or (in, out) for GPT-2's Conv1D — and ``prefix.bias``."""
        w = f"{prefix}.weight"
        if w not in self.shapes:
            raise NotThisFamily(f"no '{w}'")
        self.set(w, *((inp, out) if conv1d else (out, inp)))
        self.set(f"{prefix}.bias", out)

    def norm(self, prefix: str, g: str = RES) -> None:
        if f"{prefix}.weight" not in self.shapes:
            raise NotThisFamily(f"no '{prefix}.weight'")
        self.set(f"{prefix}.weight", Axis(g))
        self.set(f"{prefix}.bias", Axis(g))

    def keep(self, *names: str) -> None:
        """Tensors that stay fixed by design (they exist or not)."""
        self.fixed.update(n for n in names if n in self.shapes)

    def attention(
        self, layer: int, config: Config, q_rows: int, kv_rows: int, rope: bool
    ) -> tuple[AxisEntry, AxisEntry, AxisEntry, AxisEntry] | None:
        """Entries for (q out, k out, v out, o in); None (attention fixed) without a head count."""
        n_heads = _cfg(config, "num_attention_heads", "n_head", "num_heads")
        if n_heads is None:
            if layer == 0:
                self.needs_config = True
                self.notes.append(
                    "attention stays fixed: the head count is unknown (put the model's config.json "
                    "next to the weights)"
                )
            return None
        n_kv = _cfg(config, "num_key_value_heads") or n_heads
        if q_rows % n_heads or kv_rows % n_kv or q_rows // n_heads != kv_rows // n_kv or n_heads % n_kv:
            raise NotThisFamily(
                f"config heads ({n_heads} query, {n_kv} key/value) do not divide the attention "
                f"widths ({q_rows}, {kv_rows})"
            )
        hd, g = q_rows // n_heads, n_heads // n_kv
        tie = f"layers.{layer}.attn"
        if g > 1:
            # grouped-query attention: a kv head (k and v rows) moves with its query heads, and
            # the query heads may reorder within their group with o's matching columns
            qg, kv = self.group(f"{tie}.q", n_heads), self.group(f"{tie}.kv", n_kv)
            self.heads[qg] = self.heads[kv] = Heads(n_kv, tie)
            q, o, k, v = Axis(qg, hd), Axis(qg, hd), Axis(kv, hd), Axis(kv, hd)
        else:
            qk, vo = self.group(f"{tie}.qk", n_heads * hd), self.group(f"{tie}.vo", n_heads * hd)
            self.heads[qk] = self.heads[vo] = Heads(n_heads, tie)
            v = o = Axis(vo)
            if rope:  # q/k dims are bound to rotary frequencies: heads move whole
                self.sizes[qk] = n_heads
                q = k = Axis(qk, hd)
            else:
                q = k = Axis(qk)
        if layer == 0:
            if g > 1:
                what = (
                    f"whole kv heads with their {g} query heads, and query heads within their group "
                    "(grouped-query attention); dims within heads stay fixed"
                )
            elif rope:
                what = "whole heads, and v/o dims within heads (q/k dims are bound to rotary frequencies)"
            else:
                what = "whole heads, and q/k and v/o dims within heads"
            self.notes.append(f"attention: {n_heads} heads of {hd} dims; moves {what}")
        return q, k, v, o

    def finish(self, config: Config = None, heads: Sequence[str] = ()) -> PermutationSpec:
        """The spec; its output group is the residual stream when the model is headless: its
        config names a base model class (``BertModel``, ``LlamaModel``), or, without a config,
        none of the family's ``heads`` tensors is present."""
        extra = [n for n in self.shapes if n not in self.axes and n not in self.fixed]
        if extra:
            n = extra[0]
            raise NotThisFamily(f"'{n}' {tuple(self.shapes[n])} fits no {self.family} layer")
        archs = (config or {}).get("architectures") or []
        if archs and isinstance(archs[0], str):
            headless = not re.search(r"(For[A-Z]\w*|LMHead\w*|WithLMHead)$", archs[0])
        else:
            headless = not any(n.startswith(h) or f".{h}" in n for n in self.shapes for h in heads)
        spec = PermutationSpec(
            self.axes,
            self.sizes,
            family=self.family,
            heads=self.heads,
            notes=self.notes,
            output_group=RES if headless else None,
        )
        spec.needs_config = self.needs_config
        problems = spec.problems(self.shapes)
        if problems:
            raise NotThisFamily(problems[0])
        return spec


def _cfg(config: Config, *keys: str) -> Any:
    if not config:
        return None
    for k in keys:
        v = config.get(k)
        if v is not None:
            return v
    return None


def _layers(shapes: Shapes, pattern: str) -> tuple[str, list[int]]:
    """The prefix before the layer list and the layer numbers, from a regex with groups (prefix, n)
    such as ``^(.*?)h\\.(\\d+)\\.attn\\.c_attn\\.weight$``."""
    rx = re.compile(pattern)
    found: dict[str, set[int]] = {}
    for n in shapes:
        m = rx.match(n)
        if m:
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    if len(found) != 1:
        want = pattern.strip("^$").replace("(.*?)", "").replace("(\\d+)", "N").replace("\\.", ".")
        raise NotThisFamily(f"no '{want}'" if not found else f"several layer lists ({', '.join(found)})")
    prefix, nums = next(iter(found.items()))
    return prefix, sorted(nums)


def _dim(shapes: Shapes, name: str, axis: int) -> int:
    if name not in shapes:
        raise NotThisFamily(f"no '{name}'")
    return shapes[name][axis]


# ------------------------------------------------------------------------------------------- GPT-2


@register_spec(
    "gpt2",
    "Hugging Face GPT-2: wte/wpe, h.N.{ln_1, attn.c_attn (q|k|v), attn.c_proj, mlp}, ln_f",
    typical=r"(^|\.)(wte|wpe|h|ln_\d|ln_f|c_attn|c_proj|c_fc|lm_head)(\.|$)",
)
def gpt2_spec(shapes: Shapes, order: Sequence[str] | None = None, config: Config = None) -> PermutationSpec:
    p, layers = _layers(shapes, r"^(.*?)h\.(\d+)\.attn\.c_attn\.weight$")
    b = _Builder(shapes, "gpt2")
    d = _dim(shapes, f"{p}wte.weight", 1)
    res = Axis(b.group(RES, d))
    b.set(f"{p}wte.weight", None, res)
    b.set(f"{p}wpe.weight", None, res)
    if not b.has(f"{p}wpe.weight"):
        raise NotThisFamily(f"no '{p}wpe.weight'")
    for i in layers:
        h = f"{p}h.{i}"
        b.norm(f"{h}.ln_1")
        b.norm(f"{h}.ln_2")
        att = b.attention(i, config, d, d, rope=False)
        if att is None:
            b.linear(f"{h}.attn.c_attn", None, res, conv1d=True)
            b.linear(f"{h}.attn.c_proj", res, None, conv1d=True)
        else:
            q, k, v, o = att
            assert isinstance(q, Axis) and isinstance(k, Axis) and isinstance(v, Axis)
            fused = (Axis(q.group, q.inner, 0), Axis(k.group, k.inner, d), Axis(v.group, v.inner, 2 * d))
            b.linear(f"{h}.attn.c_attn", fused, res, conv1d=True)
            b.linear(f"{h}.attn.c_proj", res, o, conv1d=True)
        mlp = Axis(b.group(f"layers.{i}.mlp", _dim(shapes, f"{h}.mlp.c_fc.weight", 1)))
        b.linear(f"{h}.mlp.c_fc", mlp, res, conv1d=True)
        b.linear(f"{h}.mlp.c_proj", res, mlp, conv1d=True)
        b.keep(f"{h}.attn.bias", f"{h}.attn.masked_bias")  # causal-mask buffers
    b.norm(f"{p}ln_f")
    b.set("lm_head.weight", None, res)
    b.set("score.weight", None, res)  # GPT2ForSequenceClassification
    return b.finish(config, ("lm_head",))


# ------------------------------------------------------------------------------------------- LLaMA


@register_spec(
    "llama",
    "LLaMA / Mistral / Qwen naming: embed_tokens, layers.N.{self_attn.{q,k,v,o}_proj, "
    "mlp.{gate,up,down}_proj}",
    typical=r"(^|\.)(embed_tokens|layers|self_attn|[qkvo]_proj|gate_proj|up_proj|down_proj|"
    r"input_layernorm|post_attention_layernorm|norm|lm_head)(\.|$)",
)
def llama_spec(shapes: Shapes, order: Sequence[str] | None = None, config: Config = None) -> PermutationSpec:
    p, layers = _layers(shapes, r"^(.*?)layers\.(\d+)\.self_attn\.q_proj\.weight$")
    b = _Builder(shapes, "llama")
    d = _dim(shapes, f"{p}embed_tokens.weight", 1)
    res = Axis(b.group(RES, d))
    b.set(f"{p}embed_tokens.weight", None, res)
    for i in layers:
        h = f"{p}layers.{i}"
        b.norm(f"{h}.input_layernorm")
        b.norm(f"{h}.post_attention_layernorm")
        # Gemma-style extra norms around the blocks act on the residual stream too
        for extra in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
            if b.has(f"{h}.{extra}.weight"):
                b.norm(f"{h}.{extra}")
        a = f"{h}.self_attn"
        q_rows = _dim(shapes, f"{a}.q_proj.weight", 0)
        kv_rows = _dim(shapes, f"{a}.k_proj.weight", 0)
        att = b.attention(i, config, q_rows, kv_rows, rope=True)
        q, k, v, o = att if att is not None else (None, None, None, None)
        b.linear(f"{a}.q_proj", q, res)
        b.linear(f"{a}.k_proj", k, res)
        b.linear(f"{a}.v_proj", v, res)
        b.linear(f"{a}.o_proj", res, o)
        b.keep(f"{a}.q_norm.weight", f"{a}.k_norm.weight", f"{a}.rotary_emb.inv_freq")  # per-head-dim
        mlp = Axis(b.group(f"layers.{i}.mlp", _dim(shapes, f"{h}.mlp.up_proj.weight", 0)))
        b.linear(f"{h}.mlp.gate_proj", mlp, res)
        b.linear(f"{h}.mlp.up_proj", mlp, res)
        b.linear(f"{h}.mlp.down_proj", res, mlp)
    b.norm(f"{p}norm")
    b.set("lm_head.weight", None, res)
    b.set("score.weight", None, res)
    b.keep(f"{p}rotary_emb.inv_freq")
    return b.finish(config, ("lm_head", "score"))


# -------------------------------------------------------------------------------------------- BERT


def _bert_attention(
    b: _Builder, i: int, config: Config, res: Axis, q: str, k: str, v: str, o: str, rope: bool = False
) -> None:
    rows = _dim(b.shapes, f"{q}.weight", 0)
    att = b.attention(i, config, rows, _dim(b.shapes, f"{k}.weight", 0), rope=rope)
    eq, ek, ev, eo = att if att is not None else (None, None, None, None)
    b.linear(q, eq, res)
    b.linear(k, ek, res)
    b.linear(v, ev, res)
    b.linear(o, res, eo)


@register_spec(
    "bert",
    "Hugging Face BERT / RoBERTa: embeddings, encoder.layer.N.{attention, intermediate, output}",
    typical=r"(^|\.)(embeddings|word_embeddings|encoder|layer|attention|query|key|value|"
    r"intermediate|output|LayerNorm|pooler)(\.|$)",
)
def bert_spec(shapes: Shapes, order: Sequence[str] | None = None, config: Config = None) -> PermutationSpec:
    p, layers = _layers(shapes, r"^(.*?)encoder\.layer\.(\d+)\.attention\.self\.query\.weight$")
    b = _Builder(shapes, "bert")
    e = f"{p}embeddings"
    d = _dim(shapes, f"{e}.word_embeddings.weight", 1)
    res = Axis(b.group(RES, d))
    for t in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        b.set(f"{e}.{t}.weight", None, res)
    b.norm(f"{e}.LayerNorm")
    b.keep(f"{e}.position_ids", f"{e}.token_type_ids")
    # relative position types tie q/k dims to distance embeddings: heads move whole
    rope = _cfg(config, "position_embedding_type") not in (None, "absolute")
    for i in layers:
        h = f"{p}encoder.layer.{i}"
        s = f"{h}.attention.self"
        out = f"{h}.attention.output.dense"
        _bert_attention(b, i, config, res, f"{s}.query", f"{s}.key", f"{s}.value", out, rope)
        b.keep(f"{s}.distance_embedding.weight")
        b.norm(f"{h}.attention.output.LayerNorm")
        mlp = Axis(b.group(f"layers.{i}.mlp", _dim(shapes, f"{h}.intermediate.dense.weight", 0)))
        b.linear(f"{h}.intermediate.dense", mlp, res)
        b.linear(f"{h}.output.dense", res, mlp)
        b.norm(f"{h}.output.LayerNorm")
    if b.has(f"{p}pooler.dense.weight"):  # the pooled output is a model output: it stays fixed
        b.linear(f"{p}pooler.dense", None, res)
    c = "cls.predictions"
    if b.has(f"{c}.transform.dense.weight"):  # MLM head, its decoder often tied to word_embeddings
        b.linear(f"{c}.transform.dense", res, res)
        b.norm(f"{c}.transform.LayerNorm")
        b.set(f"{c}.decoder.weight", None, res)
        b.keep(f"{c}.decoder.bias", f"{c}.bias")
    if b.has("lm_head.dense.weight"):  # RoBERTa's MLM head
        b.linear("lm_head.dense", res, res)
        b.norm("lm_head.layer_norm")
        b.set("lm_head.decoder.weight", None, res)
        b.keep("lm_head.decoder.bias", "lm_head.bias")
    if b.has("classifier.dense.weight"):  # RoBERTa's classification head reads the first token
        b.linear("classifier.dense", None, res)
        b.keep("classifier.out_proj.weight", "classifier.out_proj.bias")
    archs = (config or {}).get("architectures") or [""]
    per_token = str(archs[0]).endswith(("ForTokenClassification", "ForQuestionAnswering")) or (
        not archs[0] and not b.has(f"{p}pooler.dense.weight")
    )
    for head in ("classifier", "qa_outputs"):  # a per-token head reads the residual stream
        if per_token and b.has(f"{head}.weight") and len(shapes[f"{head}.weight"]) == 2:
            b.set(f"{head}.weight", None, res)
    b.keep("cls.seq_relationship.weight", "cls.seq_relationship.bias", "classifier.weight", "classifier.bias")
    b.keep("qa_outputs.weight", "qa_outputs.bias")
    return b.finish(config, ("cls.", "lm_head.", "classifier", "qa_outputs"))


# --------------------------------------------------------------------------------------------- ViT


@register_spec(
    "vit",
    "Hugging Face ViT: patch-embedding conv, cls token, position embeddings, layers",
    typical=r"(^|\.)(embeddings|patch_embeddings|cls_token|position_embeddings|layernorm_before|"
    r"layernorm_after|encoder|layers?|attention|classifier)(\.|$)",
)
def vit_spec(shapes: Shapes, order: Sequence[str] | None = None, config: Config = None) -> PermutationSpec:
    new = any(re.match(r"^(.*?)layers\.\d+\.attention\.q_proj\.weight$", n) for n in shapes)
    if new:  # transformers >= 5 naming
        p, layers = _layers(shapes, r"^(.*?)layers\.(\d+)\.attention\.q_proj\.weight$")
    else:
        p, layers = _layers(shapes, r"^(.*?)encoder\.layer\.(\d+)\.attention\.attention\.query\.weight$")
    b = _Builder(shapes, "vit")
    e = f"{p}embeddings"
    proj = f"{e}.patch_embeddings.projection"
    d = _dim(shapes, f"{proj}.weight", 0)
    res = Axis(b.group(RES, d))
    b.set(f"{proj}.weight", res)
    b.set(f"{proj}.bias", res)
    b.set(f"{e}.cls_token", None, None, res)
    b.set(f"{e}.position_embeddings", None, None, res)
    b.set(f"{e}.mask_token", None, None, res)
    if not b.has(f"{e}.position_embeddings"):
        raise NotThisFamily(f"no '{e}.position_embeddings'")
    for i in layers:
        if new:
            h = f"{p}layers.{i}"
            a = f"{h}.attention"
            names = (f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj", f"{a}.o_proj")
            fc1, fc2 = f"{h}.mlp.fc1", f"{h}.mlp.fc2"
        else:
            h = f"{p}encoder.layer.{i}"
            a = f"{h}.attention.attention"
            names = (f"{a}.query", f"{a}.key", f"{a}.value", f"{h}.attention.output.dense")
            fc1, fc2 = f"{h}.intermediate.dense", f"{h}.output.dense"
        _bert_attention(b, i, config, res, *names)
        b.norm(f"{h}.layernorm_before")
        b.norm(f"{h}.layernorm_after")
        mlp = Axis(b.group(f"layers.{i}.mlp", _dim(shapes, f"{fc1}.weight", 0)))
        b.linear(fc1, mlp, res)
        b.linear(fc2, res, mlp)
    b.norm(f"{p}layernorm")
    if b.has(f"{p}pooler.dense.weight"):
        b.linear(f"{p}pooler.dense", None, res)
    b.set("classifier.weight", None, res)
    b.keep("classifier.bias")
    return b.finish(config, ("classifier",))
