"""Training policy of CheersModel: the random inputs of a training step, drawn by the recipe, not by the model.

``CheersModel.forward`` draws nothing.  A training recipe draws, per step,

* the flow noise of every generated image: :func:`flow_noise` (one ``(n_vit, packed_channels)`` tensor per generated
  image, None for images to understand);
* the classifier-free-guidance prompt dropout: :func:`cfg_dropout` (the batch's ``input_ids`` with the prompt of each
  dropped generation document replaced by ``model.null_prompt_ids``), with probability ``model.config.cfg_dropout``
  in the usual recipe;

and passes them to the model::

    from umm_ops.train import policy
    from umm_ops.utils import seed_of

    step_seed = seed_of(run_seed, step, "step")
    out = model(batch, **policy.training_inputs(model, batch, step_seed, model.config.cfg_dropout))

Every draw comes from :func:`umm_ops.utils.generator` seeded by the step seed and the sample's id (plus the image's
index inside its document for the noise), never by the batch's composition: a sample gets the same noise and the
same dropout decision in whatever batch, and at whatever position, it is packed.  The timesteps are drawn by the
packer (``umm_ops.data.packing``) and travel in the batch.

These are pure functions of (model geometry / tokenizer, batch, seed): they read the model and never change it.
"""
from __future__ import annotations

import math
import operator

import torch

from ..data.packing import ROLES
from ..utils import generator

__all__ = ["latent_shape", "flow_noise", "cfg_dropout", "training_inputs"]

GENERATE = ROLES["generate"]


def _seed(seed) -> int:
    try:
        return operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an int (e.g. umm_ops.utils.seed_of(run_seed, step, 'step')), got "
                        f"{type(seed).__name__} ({seed!r})") from None


def _docs_of_images(batch) -> list:
    """Index of the document holding each image of the batch."""
    if len(batch.images) == 0:
        return []
    starts = batch.image_spans[:, 0].cpu().contiguous()
    offs = batch.doc_offsets.cpu().contiguous()
    return (torch.searchsorted(offs, starts, right=True) - 1).tolist()


def latent_shape(model, pixel_hw) -> tuple:
    """Shape (n_vit, packed_channels) of the packed latent of one image of `pixel_hw` = (H, W) pixels, as the
    model's VAE encodes it per image: the shape of that image's flow noise."""
    return tuple(model.latent_shape(pixel_hw))


def flow_noise(model, batch, seed: int) -> list:
    """Flow noise for ``model(batch, noise=...)``: a list aligned with ``batch.images``, for each generated image a
    float32 CPU tensor of :func:`latent_shape` drawn from ``generator(seed, sample id, index of the image in its
    document, "flow-noise")``, None for each image to understand."""
    seed = _seed(seed)
    roles = batch.image_spans[:, 2].tolist()
    docs = _docs_of_images(batch)
    sids = batch.sample_ids.tolist()
    out = []
    for i, img in enumerate(batch.images):
        if roles[i] != GENERATE:
            out.append(None)
            continue
        d = docs[i]
        k = docs[:i].count(d)            # the image's index inside its document (every role counted)
        g = generator(seed, int(sids[d]), k, "flow-noise")
        out.append(torch.randn(latent_shape(model, img.shape[-2:]), generator=g, dtype=torch.float32))
    return out


def cfg_dropout(model, batch, p: float, seed: int) -> torch.Tensor:
    """``input_ids`` for ``model(batch, input_ids=...)``: each document that holds a generated image gets its prompt
    replaced by ``model.null_prompt_ids`` (every token but the vision markers and image placeholders -> <|pad|>) with
    probability `p`, drawn from ``generator(seed, sample id, "cfg-dropout")``.  Returns ``batch.input_ids`` itself
    when ``p <= 0`` or the batch generates no image (or no document is dropped); else a new tensor on its device."""
    p = float(p)
    if math.isnan(p) or p > 1.0:
        raise ValueError(f"cfg_dropout: p must be a probability in [0, 1], got {p}")
    seed = _seed(seed)
    ids = batch.input_ids
    if p <= 0.0 or len(batch.images) == 0:
        return ids
    roles = batch.image_spans[:, 2].tolist()
    docs = _docs_of_images(batch)
    added = batch.text_only_image.tolist() if batch.text_only_image is not None else [False] * len(roles)
    # the black image of a text-only sample (PackSpec.text_only_image) is no prompt to drop (released Cheers:
    # only samples with a generated image become CFG data)
    gen_docs = sorted({d for d, r, a in zip(docs, roles, added) if r == GENERATE and not a})
    sids = batch.sample_ids.tolist()
    dropped = [d for d in gen_docs
               if float(torch.rand((), generator=generator(seed, int(sids[d]), "cfg-dropout"))) < p]
    if not dropped:
        return ids
    offs = batch.doc_offsets.tolist()
    mask = torch.zeros(ids.shape[0], dtype=torch.bool)
    for d in dropped:
        mask[offs[d]:offs[d + 1]] = True
    return torch.where(mask.to(ids.device), model.null_prompt_ids(ids), ids)


def training_inputs(model, batch, seed: int, cfg_dropout_p: float) -> dict:
    """``dict(noise=flow_noise(model, batch, seed), input_ids=cfg_dropout(model, batch, cfg_dropout_p, seed))``, to
    call ``model(batch, **training_inputs(model, batch, seed, model.config.cfg_dropout))`` in a training step (an
    evaluation step passes ``cfg_dropout_p=0``)."""
    return dict(noise=flow_noise(model, batch, seed), input_ids=cfg_dropout(model, batch, cfg_dropout_p, seed))
