"""Linear probes of what the understanding path delivers to the LLM: can a linear classifier read an object's colour
and shape from the image tokens?  Tells a wiring / capacity problem (the features do not carry it) from a learning
problem (they carry it, the LLM does not use it).

    python scripts/probe_features.py runs/base/checkpoint-1800 [--n 1200] [--size 64]
    python scripts/probe_features.py --model tiny            # the untrained preset (random ViT) as a control

For single-object held-out scenes of the checkpoint's world, probes (multinomial logistic regression, full batch,
L-BFGS, 75/25 split: umm_ops.eval.tasks.probe.fit_probe, the probe of ``umm eval --tasks probe``) are fitted on:
the LLM inputs (projector output, all image tokens flattened), the ViT output, the pixels the ViT sees (the decoder
copy's reconstruction), and the true pixels (average-pooled 8x8) as a ceiling; also the mean norm of the image tokens
against that of the text token embeddings.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from umm_ops.eval.tasks.probe import fit_probe  # the probe of `umm eval --tasks probe`


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--model", default=None, help="a preset name instead of a checkpoint (untrained)")
    ap.add_argument("--n", type=int, default=1200, help="single-object scenes to probe")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from umm_ops.data.synthetic import SyntheticWorld
    from umm_ops.eval.runner import default_first, default_world_kwargs

    if args.checkpoint:
        from umm_ops.cli import _run_world
        from umm_ops.train.export import load_checkpoint_model
        first, size, world = _run_world(args.checkpoint)
        model = load_checkpoint_model(args.checkpoint)
    elif args.model:
        from umm_ops.model import CheersModel
        from umm_ops.model.config import preset
        model = CheersModel(preset(args.model))
        first, size, world = default_first(), 64, default_world_kwargs()
    else:
        ap.error("give a checkpoint or --model")
    size = args.size or size
    model.eval()
    w = SyntheticWorld(size=size, **world)
    recs, i = [], first
    while len(recs) < args.n:
        r = w[i]
        i += 1
        if len(r.scene["objects"]) == 1:
            recs.append(r)
    colors = sorted({o for o in w.colors})
    kinds = sorted({k for k in w.kinds})
    y_col = torch.tensor([colors.index(r.scene["objects"][0]["color"]) for r in recs])
    y_kind = torch.tensor([kinds.index(r.scene["objects"][0]["kind"]) for r in recs])
    y_size = torch.tensor([["small", "medium", "large"].index(r.scene["objects"][0]["size"]) for r in recs])
    pix = torch.stack([r.image for r in recs]).float() / 127.5 - 1

    feats = {"llm_inputs": [], "vit_output": [], "vit_sees": []}
    with torch.no_grad():
        for s in range(0, len(recs), 64):
            p = pix[s:s + 64]
            x1 = model.vae.encode(p)
            seen = model.vae.decode_trainable(x1.to(model.dtype), (size, size)).to(model.dtype)
            vit = model.vit(seen)
            emb = model.und_projector(vit, model.vit_grid((size, size)))
            feats["llm_inputs"].append(emb.flatten(1).float())
            feats["vit_output"].append(vit.flatten(1).float())
            feats["vit_sees"].append(torch.nn.functional.avg_pool2d(seen.float(), 8).flatten(1))
    feats = {k: torch.cat(v) for k, v in feats.items()}
    n_tok = model.vit_grid((size, size))[0] * model.vit_grid((size, size))[1] // model.config.compress ** 2
    img_norm = float(feats["llm_inputs"].view(len(recs), n_tok, -1).norm(dim=-1).mean())
    text_norm = float(model.llm.model.embed_tokens.weight.detach().norm(dim=-1).mean())
    print(f"mean norm of an image token {img_norm:.1f} (of a text token embedding {text_norm:.2f})")
    feats["true_pixels"] = torch.nn.functional.avg_pool2d(pix, 8).flatten(1)
    out = {"checkpoint": args.checkpoint or args.model, "n": len(recs), "size": size, "image_token_norm": img_norm, "text_embedding_norm": text_norm, "chance": {
        "color": 1 / len(colors), "shape": 1 / len(kinds), "size": 1 / 3}, "probes": {}}
    for name, x in feats.items():
        out["probes"][name] = {"dim": x.shape[1],
                               "color": fit_probe(x, y_col, len(colors)), "shape": fit_probe(x, y_kind, len(kinds)),
                               "size": fit_probe(x, y_size, 3)}
        print(f"{name:12s} dim {x.shape[1]:5d}  colour {out['probes'][name]['color']:.3f}  shape "
              f"{out['probes'][name]['shape']:.3f}  size {out['probes'][name]['size']:.3f}", flush=True)
    if args.json:
        from umm_ops.utils import atomic_write
        atomic_write(args.json, json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
