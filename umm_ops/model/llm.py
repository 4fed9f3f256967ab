"""A Qwen2-architecture decoder (RMSNorm, RoPE, GQA, SwiGLU, optional tied embeddings) on ``umm_ops.span_attention``.

Parameter names are exactly those of transformers' ``Qwen2ForCausalLM`` (``model.embed_tokens``,
``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``model.layers.{i}.mlp.{gate,up,down}_proj``,
``model.layers.{i}.{input,post_attention}_layernorm``, ``model.norm``, ``lm_head``), so Hugging Face checkpoints load
by name (``umm_ops.model.hf.load_llm``).

Every attention layer runs over a *packed* batch: the tokens of all documents concatenated along one axis, with a
``SpanLayout`` saying which token sees which (text causal, image blocks bidirectional, noisy latents invisible to
others, never across documents).  ``forward(input_ids)`` is the plain (B, L) causal-LM view on top of that.

Decoding keeps a ``KVCache``: the keys/values of earlier tokens, packed by document; each step's layout describes
the whole documents (cached + new tokens) with ``q_lens`` = the new tokens (span attention's cache case).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import SpanLayout, span_attention

__all__ = ["Qwen2Config", "Qwen2LM", "KVCache", "RMSNorm", "rope_cos_sin", "apply_rope", "positions_in_document",
           "causal_layout"]


# ----------------------------------------------------------------------------------------------------- config
@dataclass
class Qwen2Config:
    """Hyper-parameters of a Qwen2 decoder (names as in transformers' Qwen2Config)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None          # None -> hidden_size // num_attention_heads
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = True          # Qwen2: q/k/v projections have biases, o_proj has none
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    # not in transformers' Qwen2 (Granite's name): token embeddings are multiplied by this before the first layer
    # (the tied lm_head is not); 1.0 is Qwen2.  A model trained from scratch with initializer_range-sized
    # embeddings starts with its token identities buried under the random layers' outputs; a multiplier of
    # 1 / initializer_range starts them at unit scale - and in Cheers, whose image features enter unscaled, it made
    # the tiny model stop reading images at a 600-step budget (docs/results/base, "The LLM as a text encoder")
    embedding_multiplier: float = 1.0
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"Qwen2Config.{name} must be a positive int, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"Qwen2Config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads}) (grouped-query attention)")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"Qwen2Config: hidden_size ({self.hidden_size}) must be divisible by "
                                 f"num_attention_heads ({self.num_attention_heads}) when head_dim is not given")
        elif not isinstance(self.head_dim, int) or isinstance(self.head_dim, bool) or self.head_dim <= 0:
            raise ValueError(f"Qwen2Config.head_dim must be a positive int or None, got {self.head_dim!r}")
        if self.dim_head % 2:
            raise ValueError(f"Qwen2Config: the head dim must be even for rotary embeddings, got {self.dim_head}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"Qwen2Config.rope_theta must be a finite positive number, got {self.rope_theta!r}")
        if not (self.rms_norm_eps > 0):
            raise ValueError(f"Qwen2Config.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        m = self.embedding_multiplier
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not (m > 0 and math.isfinite(m)):
            raise ValueError(f"Qwen2Config.embedding_multiplier must be a finite positive number, got {m!r}")

    @property
    def dim_head(self) -> int:
        """The attention head dim actually used (head_dim, or hidden_size // num_attention_heads)."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict) -> "Qwen2Config":
        """From a Hugging Face Qwen2 ``config.json`` dict (transformers 4.x ``rope_theta`` or 5.x
        ``rope_parameters``).  Features this model does not implement (sliding-window attention, scaled RoPE,
        activations other than SiLU) raise instead of loading into a model that would compute something else."""
        if not isinstance(d, dict):
            raise TypeError(f"Qwen2Config.from_hf expects a dict (a config.json), got {type(d).__name__}")
        mt = d.get("model_type")
        if mt is not None and mt not in ("qwen2",):
            raise ValueError(f"Qwen2Config.from_hf: expected a Qwen2 config (model_type 'qwen2'), got model_type "
                             f"{mt!r}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"Qwen2Config.from_hf: config is missing {missing}")
        if d.get("use_sliding_window", False):
            raise NotImplementedError("Qwen2Config.from_hf: use_sliding_window=true is not supported (every layer "
                                      "here attends over the full span layout)")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"Qwen2Config.from_hf: hidden_act must be 'silu' (SwiGLU), got {act!r}")
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            raise NotImplementedError(f"Qwen2Config.from_hf: only the default RoPE is supported, got rope_type "
                                      f"{rope_type!r}")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))  # transformers' Qwen2 default is 1e4
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads, head_dim=d.get("head_dim"),
            rope_theta=float(theta), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),  # transformers' default for Qwen2
            attention_bias=True, max_position_embeddings=d.get("max_position_embeddings", 32768),
            initializer_range=float(d.get("initializer_range", 0.02)),
            embedding_multiplier=d.get("embedding_multiplier", 1.0), bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"), pad_token_id=d.get("pad_token_id"))

    def to_hf(self) -> dict:
        """A ``config.json`` dict that transformers (4.x and 5.x) loads as Qwen2ForCausalLM."""
        if self.embedding_multiplier != 1.0:
            raise ValueError(f"Qwen2Config.to_hf: embedding_multiplier = {self.embedding_multiplier} has no "
                             f"counterpart in transformers' Qwen2, which would load this model computing something "
                             f"else")
        out = {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "rope_theta": self.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "initializer_range": self.initializer_range,
            "use_sliding_window": False, "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
        }
        if self.head_dim is not None:
            out["head_dim"] = self.head_dim
        return out

    def replace(self, **kw) -> "Qwen2Config":
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------------------------------- pieces
class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back before the weight (as transformers' Qwen2RMSNorm,
    so half-precision models round at the same place)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope_cos_sin(position_ids: torch.Tensor, dim: int, theta: float, dtype: torch.dtype,
                 inv_freq_dtype: torch.dtype | None = None):
    """cos, sin of shape (*position_ids.shape, dim) for rotate-half RoPE.

    The angles are computed in float32 whatever the model dtype (as transformers does, so checkpoints see the
    rounding they were trained with), then cast to ``dtype``.  inv_freq_dtype: the inverse frequencies are first
    rounded to it - what ``model.to(torch.bfloat16)`` does to transformers' non-persistent ``inv_freq`` buffer, and
    so what the released Cheers inference scripts run (``Qwen2LM.round_rope_inv_freq``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=position_ids.device).float()
                                / dim))
    if inv_freq_dtype is not None:
        inv_freq = inv_freq.to(inv_freq_dtype).float()
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (L, H, D) rotated by cos/sin (L, D)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + _rotate_half(x) * sin


def positions_in_document(layout: SpanLayout) -> torch.Tensor:
    """(total_q,) int64: each query's position inside its own document (0 at the document's first token, cached
    tokens included) - the RoPE positions of a packed batch whose documents each start at position 0."""
    if not isinstance(layout, SpanLayout):
        raise TypeError(f"positions_in_document expects a SpanLayout, got {type(layout).__name__}")
    cu_q, cu_k = layout.cu_seqlens_q.long(), layout.cu_seqlens_k.long()
    doc_q = torch.repeat_interleave(torch.arange(layout.num_docs, device=cu_q.device), cu_q[1:] - cu_q[:-1],
                                    output_size=layout.total_q)
    return layout.q_positions() - cu_k[doc_q]


def causal_layout(lengths, device=None) -> SpanLayout:
    """The layout of independent causal text documents of the given lengths."""
    return SpanLayout.from_segments([[(int(n), "causal")] for n in lengths], device=device)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.dim_head)
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, layout: SpanLayout, step: "_CacheStep | None" = None):
        L = x.shape[0]
        q = self.q_proj(x).view(L, self.n_heads, self.head_dim)          # (L, Hq, Dh)
        k = self.k_proj(x).view(L, self.n_kv_heads, self.head_dim)       # (L, Hkv, Dh)
        v = self.v_proj(x).view(L, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if step is not None:                                             # prepend the cached tokens per document
            k, v = step.extend(self.layer_idx, k, v)                     # (Lk_total, Hkv, Dh)
        out = span_attention(q, k, v, layout)                            # (L, Hq, Dh)
        return self.o_proj(out.reshape(L, self.n_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, layout, step=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """The decoder stack (``model.`` in Qwen2ForCausalLM's names)."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# ----------------------------------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values (after RoPE) of the tokens seen so far, per layer, packed by document.

    Filled by ``Qwen2LM.forward_packed(..., cache=cache)``: the first call (empty cache) must give every token of
    every document as a query (the prefill); later calls give, per document, only the new tokens as queries
    (``SpanLayout.from_segments(all_segments, q_lens=new_counts)``, a document may add 0 tokens) and the cache
    prepends the earlier keys/values of each document.  Use :meth:`layout_for` and :meth:`positions_for` to build
    those inputs.  ``update_cache=False`` runs a step against the cache without appending to it (Cheers' image
    steps: the prompt stays cached, the image tokens are recomputed every step).

    Each appending step rebuilds the packed (total, Hkv, Dh) tensors (one gather per layer): O(cached tokens)
    memory traffic per step, no padding anywhere.
    """

    def __init__(self, num_layers: int):
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"KVCache: num_layers must be a positive int, got {num_layers!r}")
        self.num_layers = num_layers
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.cu_seqlens: torch.Tensor | None = None   # (D+1,) int32: document offsets in the packed cache
        self.total = 0                                # cached tokens over all documents (host int)
        self.docs: list | None = None                 # host segments [(length, mode), ...] per document
        self._pending = None                          # (layout, docs) of the last layout_for

    # -- inspection
    @property
    def num_docs(self) -> int:
        return 0 if self.cu_seqlens is None else self.cu_seqlens.shape[0] - 1

    def lengths(self) -> list[int]:
        """Cached tokens per document (host ints)."""
        if self.docs is not None:
            return [sum(n for n, _ in doc) for doc in self.docs]
        if self.cu_seqlens is None:
            return []
        cu = self.cu_seqlens.tolist()
        return [b - a for a, b in zip(cu[:-1], cu[1:])]

    def __len__(self) -> int:
        return self.total

    def __repr__(self) -> str:
        return f"KVCache(layers={self.num_layers}, docs={self.num_docs}, tokens={self.total})"

    # -- building the inputs of the next step
    def layout_for(self, new_segments, device=None) -> SpanLayout:
        """The layout of a step adding ``new_segments[d]`` (a list of (length, mode) pairs, possibly empty) to
        document d.  Empty cache: the prefill layout of those documents.  A new causal run directly after a
        cached causal segment continues it."""
        if not isinstance(new_segments, (list, tuple)):
            raise TypeError(f"KVCache.layout_for: new_segments must be a list (one list of (length, mode) pairs per "
                            f"document), got {type(new_segments).__name__}")
        if self.total == 0:
            docs = [[tuple(seg) for seg in s] for s in new_segments]
            layout = SpanLayout.from_segments(docs, device=device)
            self._pending = (layout, docs)
            return layout
        if len(new_segments) != self.num_docs:
            raise ValueError(f"KVCache.layout_for: the cache holds {self.num_docs} documents, got new segments for "
                             f"{len(new_segments)}")
        docs, q_lens = [], []
        for old, new in zip(self._host_docs(), new_segments):
            doc = list(old)
            for seg in new:
                if (doc and seg[1] == "causal" and doc[-1][1] == "causal" and isinstance(seg[0], int)):
                    doc[-1] = (doc[-1][0] + seg[0], "causal")
                else:
                    doc.append(tuple(seg))
            docs.append(doc)
            q_lens.append(sum(int(n) for n, _ in new))
        layout = SpanLayout.from_segments(docs, q_lens=q_lens, device=device if device is not None else
                                          self.cu_seqlens.device)
        self._pending = (layout, docs)
        return layout

    def positions_for(self, layout: SpanLayout) -> torch.Tensor:
        """RoPE positions of a step's queries: their index inside their document, cached tokens counted."""
        return positions_in_document(layout)

    def _host_docs(self):
        if self.docs is None:
            raise RuntimeError("KVCache: the cache is empty (run a prefill through Qwen2LM.forward_packed first)")
        return self.docs

    # -- editing
    def select(self, doc_indices) -> "KVCache":
        """Keep only the given documents (in that order), e.g. to drop finished sequences; in place, returns self."""
        if self.total == 0:
            raise RuntimeError("KVCache.select: the cache is empty")
        idx = [int(i) for i in doc_indices]
        if any(i < 0 or i >= self.num_docs for i in idx):
            raise IndexError(f"KVCache.select: document indices must be in [0, {self.num_docs}), got {idx}")
        if not idx:
            raise ValueError("KVCache.select: keep at least one document (drop the cache instead)")
        cu = self.cu_seqlens.tolist()
        dev = self.cu_seqlens.device
        rows = torch.cat([torch.arange(cu[i], cu[i + 1], device=dev) for i in idx])
        for layer in range(self.num_layers):
            if self.k[layer] is not None:
                self.k[layer] = self.k[layer].index_select(0, rows)
                self.v[layer] = self.v[layer].index_select(0, rows)
        lens = [cu[i + 1] - cu[i] for i in idx]
        self.cu_seqlens = torch.tensor([0] + list(_accumulate(lens)), dtype=torch.int32, device=dev)
        self.total = sum(lens)
        if self.docs is not None:
            self.docs = [self.docs[i] for i in idx]
        return self

    def clone(self) -> "KVCache":
        """A copy sharing no storage that later steps modify (the tensors themselves are never written in place,
        so sharing them is safe)."""
        c = KVCache(self.num_layers)
        c.k, c.v = list(self.k), list(self.v)
        c.cu_seqlens, c.total = self.cu_seqlens, self.total
        c.docs = None if self.docs is None else [list(d) for d in self.docs]
        return c

    # -- used by the model
    def _begin(self, layout: SpanLayout, update: bool) -> "_CacheStep":
        if self.total == 0:
            if not update:
                raise RuntimeError("KVCache: update_cache=False needs a filled cache (run the prefill first)")
            if layout.total_q != layout.total_k:
                raise ValueError(f"KVCache: the first step on an empty cache must give every token as a query "
                                 f"(total_q == total_k), got total_q={layout.total_q}, total_k={layout.total_k}")
            return _CacheStep(self, layout, None, update)
        if layout.num_docs != self.num_docs:
            raise ValueError(f"KVCache: the layout has {layout.num_docs} documents, the cache {self.num_docs}")
        if layout.total_k - layout.total_q != self.total:
            raise ValueError(f"KVCache: the layout's keys minus queries ({layout.total_k} - {layout.total_q}) must "
                             f"equal the cached tokens ({self.total}): build it with cache.layout_for(...)")
        cu_q, cu_k = layout.cu_seqlens_q.long(), layout.cu_seqlens_k.long()
        old_off = cu_k - cu_q                          # (D+1,) offsets of each document's cached tokens
        if not torch.equal(old_off, self.cu_seqlens.long()):
            raise ValueError(f"KVCache: per document, the layout's keys minus queries {_diffs(old_off)} must equal "
                             f"the cached lengths {_diffs(self.cu_seqlens)}")
        # gather index of the new packed key stream into cat([cached, new])
        Lk, dev = layout.total_k, cu_k.device
        doc = torch.repeat_interleave(torch.arange(layout.num_docs, device=dev), cu_k[1:] - cu_k[:-1],
                                      output_size=Lk)
        j = torch.arange(Lk, device=dev) - cu_k[doc]
        n_old = old_off[doc + 1] - old_off[doc]
        index = torch.where(j < n_old, old_off[doc] + j, self.total + cu_q[doc] + j - n_old)
        return _CacheStep(self, layout, index, update)


class _CacheStep:
    """One forward step against a KVCache (built once, used by every layer)."""

    def __init__(self, cache: KVCache, layout: SpanLayout, index, update: bool):
        self.cache, self.layout, self.index, self.update = cache, layout, index, update

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        c = self.cache
        if self.index is None:
            k_all, v_all = k, v
        else:
            k_old, v_old = c.k[layer], c.v[layer]
            if k_old.shape[1:] != k.shape[1:] or k_old.dtype != k.dtype or k_old.device != k.device:
                raise ValueError(f"KVCache layer {layer}: cached keys {tuple(k_old.shape)} {k_old.dtype} "
                                 f"{k_old.device} do not match new keys {tuple(k.shape)} {k.dtype} {k.device}")
            k_all = torch.cat([k_old, k]).index_select(0, self.index)
            v_all = torch.cat([v_old, v]).index_select(0, self.index)
        if self.update:
            c.k[layer], c.v[layer] = k_all, v_all
        return k_all, v_all

    def commit(self):
        if not self.update:
            return
        c, lay = self.cache, self.layout
        c.cu_seqlens = lay.cu_seqlens_k
        c.total = lay.total_k
        pending = c._pending
        # host segments: known when the layout came from layout_for, else read from its (small) tensors
        c.docs = pending[1] if pending is not None and pending[0] is lay else lay.segments()[0]
        c._pending = None


def _accumulate(xs):
    s = 0
    for x in xs:
        s += x
        yield s


def _diffs(cu: torch.Tensor) -> list:
    cu = cu.tolist()
    return [b - a for a, b in zip(cu[:-1], cu[1:])]


# ----------------------------------------------------------------------------------------------------- the LM
class Qwen2LM(nn.Module):
    """Qwen2 causal LM with transformers' Qwen2ForCausalLM parameter names, every attention on span_attention.

    ``forward(input_ids (B, L)) -> logits (B, L, V)``; ``forward_packed(inputs_embeds (L, D), position_ids (L,),
    layout, cache=None) -> hidden (L, D)`` (after the final norm) for packed multimodal batches;
    ``logits(hidden)``; ``embed(ids)``.
    """

    def __init__(self, config: Qwen2Config):
        super().__init__()
        if not isinstance(config, Qwen2Config):
            raise TypeError(f"Qwen2LM expects a Qwen2Config, got {type(config).__name__}")
        self.config = config
        # True: RoPE's inverse frequencies rounded to the activations' dtype first (transformers' inv_freq buffer
        # after model.to(dtype); set by CheersModel under the "cheers" profile); the identity in float32
        self.round_rope_inv_freq = False
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.tie_weights()
        self.init_weights()

    def tie_weights(self):
        """lm_head shares the embedding matrix when config.tie_word_embeddings (call again after anything that
        replaces parameters, e.g. ``to_empty``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self):
        """transformers' init: normal(0, initializer_range) matrices and embeddings, zero biases, unit norms."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_hidden_layers)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (any shape) -> embeddings (..., hidden_size)."""
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids must be an int64/int32 tensor, got "
                            f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        e = self.model.embed_tokens(ids)
        return e if self.config.embedding_multiplier == 1.0 else e * self.config.embedding_multiplier

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden_size) -> (..., vocab_size)."""
        return self.lm_head(hidden)

    def forward_packed(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, layout: SpanLayout,
                       cache: KVCache | None = None, update_cache: bool = True, layer_rows=None):
        """Run the decoder over a packed batch.

        Args:
            inputs_embeds: (L, D) the embeddings of the query tokens of all documents, concatenated
                (``layout.total_q`` rows).
            position_ids: (L,) integer RoPE positions (e.g. ``positions_in_document(layout)``).
            layout: the SpanLayout of the batch; with a cache, its documents cover cached + new tokens and its
                ``q_lens`` are the new tokens.
            cache: a KVCache (empty for the prefill); appended to unless ``update_cache=False``.
            layer_rows: optional (R,) integer indices into the L query rows: also return the output of every decoder
                layer (the residual stream before the final norm) at those rows.
        Returns the final-normed hidden states (L, D); with ``layer_rows`` the pair (hidden, layers) where layers is
        (num_hidden_layers, R, D), layer i's output at the rows (differentiable).
        """
        cfg = self.config
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 2 \
                or inputs_embeds.shape[1] != cfg.hidden_size:
            raise ValueError(f"inputs_embeds must be a (L, {cfg.hidden_size}) tensor, got "
                             f"{tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else inputs_embeds!r}")
        L = inputs_embeds.shape[0]
        if not isinstance(position_ids, torch.Tensor) or position_ids.shape != (L,) \
                or position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
            raise ValueError(f"position_ids must be an integer tensor of shape ({L},), got "
                             f"{(tuple(position_ids.shape), position_ids.dtype) if isinstance(position_ids, torch.Tensor) else position_ids!r}")
        if not isinstance(layout, SpanLayout):
            raise TypeError(f"layout must be a umm_ops.SpanLayout, got {type(layout).__name__}")
        if layout.total_q != L:
            raise ValueError(f"inputs_embeds has {L} rows but the layout has {layout.total_q} queries")
        if cache is None and layout.total_k != L:
            raise ValueError(f"the layout has {layout.total_k} keys for {L} queries: a cache-case layout (q_lens) "
                             f"needs the KVCache of the earlier tokens")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
        if cache is not None and cache.num_layers != cfg.num_hidden_layers:
            raise ValueError(f"the cache has {cache.num_layers} layers, the model {cfg.num_hidden_layers}")
        if layer_rows is not None:
            if not isinstance(layer_rows, torch.Tensor) or layer_rows.dim() != 1 or layer_rows.is_floating_point() \
                    or layer_rows.dtype == torch.bool or layer_rows.is_complex():
                raise ValueError(f"layer_rows must be a 1-D integer tensor of row indices, got "
                                 f"{(tuple(layer_rows.shape), layer_rows.dtype) if isinstance(layer_rows, torch.Tensor) else type(layer_rows).__name__}")
            if layer_rows.numel() and (int(layer_rows.min()) < 0 or int(layer_rows.max()) >= L):
                raise ValueError(f"layer_rows must index the {L} query rows (0..{L - 1}), got values in "
                                 f"[{int(layer_rows.min())}, {int(layer_rows.max())}]")
            layer_rows = layer_rows.to(inputs_embeds.device, torch.long)
        step = cache._begin(layout, update_cache) if cache is not None else None
        x = inputs_embeds
        cos, sin = rope_cos_sin(position_ids, cfg.dim_head, cfg.rope_theta, x.dtype,   # (L, Dh)
                                x.dtype if self.round_rope_inv_freq else None)
        taken = []
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and step is None and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, layout, use_reentrant=False)
            else:
                x = layer(x, cos, sin, layout, step)
            if layer_rows is not None:
                taken.append(x.index_select(0, layer_rows))
        if step is not None:
            step.commit()
        if layer_rows is not None:
            return self.model.norm(x), torch.stack(taken)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Causal LM logits (B, L, vocab) of equal-length sequences (B, L) (each row its own document)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (B, L) tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
        B, L = input_ids.shape
        if B == 0 or L == 0:
            raise ValueError(f"input_ids must be non-empty, got shape {(B, L)}")
        layout = causal_layout([L] * B, device=input_ids.device)
        pos = torch.arange(L, device=input_ids.device).repeat(B)
        h = self.forward_packed(self.embed(input_ids.reshape(-1)), pos, layout)
        return self.logits(h).view(B, L, -1)

    def num_parameters(self) -> int:
        """Distinct parameters (the tied lm_head counted once)."""
        return sum(p.numel() for p in self.parameters())
