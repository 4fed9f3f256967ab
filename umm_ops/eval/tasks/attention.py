"""attention: the share of attention mass from answer tokens to image tokens, per LLM layer (SGT's analysis of
visual-text attention allocation).

Per held-out record its evaluation question (the one ``vqa`` / ``vqa-short`` ask, :func:`.vqa.pick_question`),
short-answer form, is run teacher-forced: [the picture to understand] [question] [the true answer word + end
token].  Forward pre-hooks on every decoder layer's attention module record its inputs (the normed hidden states,
RoPE cos / sin and the span layout); after the forward, the queries and keys are recomputed from them with the
module's own projections and RoPE, and a reference softmax attention (:func:`attention_probs`: scores q k^T /
sqrt(d) under the layout's dense mask, GQA as the kernel does it) gives the probabilities.  Nothing in the model
or its kernels changes.  An item (record, layer) scores

    share = mean over the answer's tokens (queries) and heads of the attention mass on the picture's image tokens

(the <|image_pad|> span; its wrapper tokens excluded).  ``uniform`` (the share if every query spread its attention
evenly over the keys it may see) is reported per layer beside it as a reference.  Per layer (``per_type``).
"""
from __future__ import annotations

import math

import torch

from . import EvalContext, Task, TaskOutput, pixel_range, pixels, register

__all__ = ["AttentionTask", "attention_probs", "attention_share", "AttentionRecorder"]


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, rows=None) -> torch.Tensor:
    """Reference attention probabilities (Hq, R, Lk) of queries q (Lq, Hq, D) (only ``rows`` of them when given)
    over keys k (Lk, Hkv, D) under a boolean mask (Lq, Lk) (True = may attend); query head h uses kv head
    h // (Hq / Hkv).  A row that may attend to nothing gets zeros."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[2] != k.shape[2]:
        raise ValueError(f"attention_probs: q (Lq, Hq, D) and k (Lk, Hkv, D) with the same D, got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    Lq, Hq, D = q.shape
    Lk, Hkv, _ = k.shape
    if Hq % Hkv:
        raise ValueError(f"attention_probs: {Hq} query heads are not a multiple of {Hkv} kv heads")
    if tuple(mask.shape) != (Lq, Lk) or mask.dtype != torch.bool:
        raise ValueError(f"attention_probs: mask must be bool ({Lq}, {Lk}), got {mask.dtype} {tuple(mask.shape)}")
    if rows is not None:
        rows = torch.as_tensor(rows, dtype=torch.long, device=q.device)
        q, mask = q[rows], mask[rows]
    kk = k.repeat_interleave(Hq // Hkv, dim=1).float()
    s = torch.einsum("qhd,khd->hqk", q.float(), kk) / math.sqrt(D)
    s = s.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.where(mask.any(-1)[None, :, None], p, torch.zeros_like(p)).nan_to_num(0.0)


def attention_share(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, rows, cols) -> float:
    """Mean over heads and the query ``rows`` of the attention mass on the key ``cols``."""
    rows, cols = list(rows), list(cols)
    if not rows or not cols:
        raise ValueError(f"attention_share: needs query rows and key columns, got {len(rows)} rows, {len(cols)} cols")
    p = attention_probs(q, k, mask, rows)
    return float(p[:, :, cols].sum(-1).mean())


class AttentionRecorder:
    """Context manager: forward pre-hooks on each decoder layer's attention record (x, cos, sin, layout);
    ``qk(layer)`` recomputes that layer's (q, k) after RoPE with the module's own weights."""

    def __init__(self, llm):
        self.modules = [lay.self_attn for lay in llm.model.layers]
        self.inputs: list = [None] * len(self.modules)
        self._hooks: list = []

    def __enter__(self):
        for i, m in enumerate(self.modules):
            self._hooks.append(m.register_forward_pre_hook(self._hook(i)))
        return self

    def _hook(self, i):
        def hook(module, args):
            x, cos, sin, layout = args[:4]
            if len(args) > 4 and args[4] is not None:
                raise RuntimeError("AttentionRecorder: a cached (incremental) forward; record a full forward")
            self.inputs[i] = (x.detach(), cos.detach(), sin.detach(), layout)
        return hook

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def qk(self, i: int):
        from ...model.llm import apply_rope

        m = self.modules[i]
        x, cos, sin, layout = self.inputs[i]
        L = x.shape[0]
        q = m.q_proj(x).view(L, m.n_heads, m.head_dim)
        k = m.k_proj(x).view(L, m.n_kv_heads, m.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), layout


@register
class AttentionTask(Task):
    name = "attention"
    ci = "bootstrap"
    breakdowns = ("type", "qtype")
    metrics = {"uniform": ("uniform", "bootstrap")}
    needs = "understanding (VQA) in its training mix; compare checkpoints layer by layer"

    def run(self, model, ctx: EvalContext) -> TaskOutput:
        from ...attention.layout import span_mask
        from ...data.packing import ImageItem, Sample, TextItem, pack
        from ...data.synthetic import END, format_question
        from .vqa import pick_question

        recs = ctx.records()
        spec = model.pack_spec()
        items = []
        for _, chunk in ctx.batches(recs):
            qs = [pick_question(ctx, r) for r in chunk]
            rng = pixel_range(model)
            samples = [Sample([ImageItem(pixels(r.image, rng), "understand"), TextItem(format_question(q, False)),
                               TextItem(q["answer"] + END, loss=True)]) for r, q in zip(chunk, qs)]
            for batch in pack(samples, spec):
                with torch.no_grad(), AttentionRecorder(model.llm) as rec:
                    model(batch)
                    docs = []
                    offs = batch.doc_offsets.tolist()
                    for d in range(batch.num_docs):
                        img = [(a, n) for a, n, _ in batch.image_spans.tolist() if offs[d] <= a < offs[d + 1]]
                        ans = [(a, n) for a, n, loss, dd in batch.text_spans.tolist() if dd == d and loss]
                        if len(img) != 1 or len(ans) != 1:
                            raise RuntimeError(f"attention: document {d} has {len(img)} images, {len(ans)} answers")
                        docs.append((list(range(ans[0][0], ans[0][0] + ans[0][1])),
                                     list(range(img[0][0], img[0][0] + img[0][1]))))
                    for layer in range(len(rec.modules)):
                        q, k, layout = rec.qk(layer)
                        mask = span_mask(layout).to(q.device)
                        for d, (rows, cols) in enumerate(docs):
                            share = attention_share(q, k, mask, rows, cols)
                            vis = mask[rows].float()
                            uniform = float((vis[:, cols].sum(-1) / vis.sum(-1)).mean())
                            sid = int(batch.sample_ids[d])
                            r, qq = chunk[sid], qs[sid]
                            items.append({"index": r.index, "score": share, "uniform": uniform,
                                          "type": f"layer {layer + 1}", "qtype": qq["type"], "layer": layer + 1})
        items.sort(key=lambda it: (it["index"], it["layer"]))
        return TaskOutput(items, {"layers": len(model.llm.model.layers)})
