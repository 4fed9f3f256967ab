"""probe: linear separability of scene facts in the LLM's hidden states of image tokens, per layer (SGT's analysis).

Each held-out picture goes through the model alone (a document holding only the picture to understand); the
hidden states at its image tokens are mean-pooled, at every depth: ``layer 0`` = the LLM's inputs (the
understanding projector's output), ``layer k`` = the output of decoder layer k (read with forward hooks on the
decoder layers; nothing in the model changes).  Per fact and layer a multinomial logistic regression
(:func:`fit_probe`: standardised features, L2 1e-3, full-batch L-BFGS with a fixed budget of ``MAX_ITER``
iterations) is fitted on the first 75% of the eligible records (index order) and scored on the rest:

    count     the number of objects                                   every record
    color     the object's colour                                      one-object scenes
    shape     the object's shape kind                                  one-object scenes
    position  the quadrant of the object's centre (upper/lower x left/right)   one-object scenes

An item is one held-out record under one (fact, layer) probe: score 1 when the probe predicts its label.  The
headline is the mean over every probe; ``per_probe`` gives each (fact, layer) accuracy, ``per_type`` each fact over
layers, ``per_layer`` each layer over facts; ``chance`` (the commonest training label's share of the held-out
labels) per fact.  A fact with fewer than MIN_TRAIN training records or one class is skipped and named in
``skipped``.  Use n >= 256 (half the base world's scenes hold one object).  Mean pooling discards which token
holds the object: at layer 0 the quadrant is nearly unreadable by construction, and a later layer reads it only
where the LLM has written position (RoPE acts inside attention) into the tokens' contents.
"""
from __future__ import annotations

import torch

from . import EvalContext, Task, TaskOutput, pixel_range, pixels, register

__all__ = ["ProbeTask", "fit_probe", "probe_predict", "image_token_features", "scene_facts", "FACTS"]

FACTS = ("count", "color", "shape", "position")
MAX_ITER = 200
L2 = 1e-3
TRAIN_FRAC = 0.75
MIN_TRAIN = 8


def probe_predict(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, n_cls: int, l2: float = L2,
                  max_iter: int = MAX_ITER) -> torch.Tensor:
    """Predicted labels of x_test from a multinomial logistic regression fitted on (x_train, y_train), features
    standardised with the training split's mean / std; deterministic (full batch L-BFGS from zero weights)."""
    if x_train.dim() != 2 or x_test.dim() != 2 or x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"probe: features must be (n, d) with the same d, got {tuple(x_train.shape)} and "
                         f"{tuple(x_test.shape)}")
    if y_train.shape != (x_train.shape[0],):
        raise ValueError(f"probe: {x_train.shape[0]} training rows but labels of shape {tuple(y_train.shape)}")
    if y_train.numel() and (int(y_train.min()) < 0 or int(y_train.max()) >= n_cls):
        raise ValueError(f"probe: labels must lie in [0, {n_cls}), got [{int(y_train.min())}, {int(y_train.max())}]")
    xt, xs = x_train.double(), x_test.double()
    mu, sd = xt.mean(0), xt.std(0).nan_to_num(0.0).clamp_min(1e-6)
    xt, xs = (xt - mu) / sd, (xs - mu) / sd
    with torch.enable_grad():
        w = torch.zeros(xt.shape[1], n_cls, dtype=torch.double, requires_grad=True)
        b = torch.zeros(n_cls, dtype=torch.double, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xt @ w + b, y_train) + l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        return (xs @ w + b).argmax(1)


def fit_probe(x: torch.Tensor, y: torch.Tensor, n_cls: int, train_frac: float = TRAIN_FRAC, l2: float = L2,
              max_iter: int = MAX_ITER) -> float:
    """Held-out accuracy of a probe fitted on the first train_frac of (x, y) and scored on the rest."""
    k = int(x.shape[0] * train_frac)
    if k < 1 or k >= x.shape[0]:
        raise ValueError(f"fit_probe: {x.shape[0]} rows leave no training or no held-out split at {train_frac}")
    return float((probe_predict(x[:k], y[:k], x[k:], n_cls, l2, max_iter) == y[k:]).double().mean())


def scene_facts(record) -> dict:
    """{fact: label} of a record (count always; colour / shape / position for one-object scenes)."""
    objs = record.scene["objects"]
    out = {"count": str(len(objs))}
    if len(objs) == 1:
        o = objs[0]
        S = record.scene["size"]
        cx, cy = (o["bbox"][0] + o["bbox"][2]) / 2, (o["bbox"][1] + o["bbox"][3]) / 2
        out.update(color=o["color"], shape=o["kind"],
                   position=("upper" if cy < S / 2 else "lower") + " " + ("left" if cx < S / 2 else "right"))
    return out


@torch.no_grad()
def image_token_features(model, images, batch_size: int = 16) -> torch.Tensor:
    """Mean-pooled hidden states at the image tokens of each picture (a document of its own), per depth:
    (n_layers + 1, N, D) float32 (0: the LLM inputs, k: decoder layer k's output)."""
    from ...data.packing import ImageItem, Sample, pack

    layers = list(model.llm.model.layers)
    caught: list = []
    hooks = [layers[0].register_forward_pre_hook(lambda m, args: caught.append(args[0].detach()))]
    hooks += [lay.register_forward_hook(lambda m, args, out: caught.append(out.detach())) for lay in layers]
    feats = []
    try:
        spec = model.pack_spec()
        for s in range(0, len(images), batch_size):
            chunk = images[s:s + batch_size]
            for batch in pack([Sample([ImageItem(im, "understand")]) for im in chunk], spec):
                caught.clear()
                model(batch)
                if len(caught) != len(layers) + 1:
                    raise RuntimeError(f"probe: caught {len(caught)} hidden states for {len(layers)} layers + inputs")
                spans = batch.image_spans.tolist()
                feats.append(torch.stack([torch.stack([h[a:a + n].float().mean(0) for a, n, _ in spans])
                                          for h in caught]).cpu())
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(feats, dim=1)


@register
class ProbeTask(Task):
    name = "probe"
    ci = "wilson"
    breakdowns = ("type", "layer", "probe")
    needs = "any model (compare checkpoints: the accuracy is what a linear read-out finds in the features)"

    def run(self, model, ctx: EvalContext) -> TaskOutput:
        recs = ctx.records()
        rng = pixel_range(model)
        x = image_token_features(model, [pixels(r.image, rng) for r in recs], ctx.batch_size)   # (L+1, N, D)
        facts = [scene_facts(r) for r in recs]
        items, chance, skipped, sizes = [], {}, {}, {}
        for fact in FACTS:
            rows = [j for j, f in enumerate(facts) if fact in f]
            k = int(len(rows) * TRAIN_FRAC)
            labels = sorted({facts[j][fact] for j in rows[:k]})
            if k < MIN_TRAIN or len(labels) < 2 or k == len(rows):
                skipped[fact] = (f"{len(rows)} eligible records, {k} to train on, {len(labels)} classes (needs "
                                 f">= {MIN_TRAIN} and >= 2; raise n)")
                continue
            # a held-out label never seen in training cannot be predicted: it stays in the test set (scored 0)
            ids = {lab: c for c, lab in enumerate(labels)}
            y = torch.tensor([ids.get(facts[j][fact], -1) for j in rows])
            test = rows[k:]
            common = max(labels, key=lambda lab: sum(facts[j][fact] == lab for j in rows[:k]))
            chance[fact] = sum(facts[j][fact] == common for j in test) / len(test)
            sizes[fact] = {"train": k, "test": len(test), "classes": len(labels)}
            for layer in range(x.shape[0]):
                feats = x[layer][rows]
                pred = probe_predict(feats[:k], y[:k], feats[k:], len(labels))
                for j, p, t in zip(test, pred.tolist(), y[k:].tolist()):
                    items.append({"index": recs[j].index, "score": 1.0 if p == t else 0.0, "type": fact,
                                  "layer": f"layer {layer}", "probe": f"{fact} @ layer {layer}",
                                  "label": facts[j][fact], "predicted": labels[p]})
        if not items:
            raise ValueError(f"probe: no fact could be probed on {len(recs)} records ({skipped}); raise n")
        return TaskOutput(items, {"chance": chance, "skipped": skipped, "splits": sizes, "layers": x.shape[0],
                                  "max_iter": MAX_ITER, "l2": L2})
