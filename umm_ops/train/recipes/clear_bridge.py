"""CLEAR stage 2, the latent representation bridge (papers.md section 2; issue 16): ``clear-bridge``.

    umm train --recipe clear-bridge --set recipe.init=runs/base5/checkpoint-1800 --out runs/bridge1

The clear-sft recipe (generate-then-answer samples, same data, settings and evaluation) plus CLEAR's bridge loss:
the LLM hidden states at the restored image's tokens (student) are pulled towards those at the clean picture's
understanding tokens (teacher, detached), ``loss = sft loss + bridge_weight * bridge``.

How CLEAR's BAGEL design maps onto this model (read from CLEAR's released modeling/bagel/bagel.py and
data/interleave_datasets/interleave_t2i_dataset.py + data/dataset_base.py):

* CLEAR's restored image appears three times in a training sequence: the generated VAE latent (noised, MSE loss),
  a clean VAE copy (t = clean, no loss) and a ViT copy; the distillation pairs the clean VAE copy (student: what the
  bridge writes into the KV cache at inference) with the ViT copy (teacher: what the answer was trained to read).
  The noised generation span is not distilled.
* Here both the generation side and the understanding side turn a latent into LLM tokens through one path
  (decoder copy -> ViT -> projector; t is never fed to the LLM), so a clean latent at t = 1 *is* an image to
  understand: what differs between the bridge's tokens at inference and the answer's input in training is the
  context, not the embedding.  The SFT sample reads [degraded image][question][reasoning <image_restore>]
  [restored image, generated at t][restored image, understood][answer]; at inference the bridge writes the restored
  latent at t = 1 right after <image_restore> (the generation span's slot) and the answer reads it there, without
  the noised generation span before it.
* Student ``"clean"`` (default, CLEAR's choice): a second document in the same packed batch, the sample cut before
  its generation span with the clean picture as the image to understand in that slot, i.e. exactly the sequence the
  bridge builds at inference with a perfect restoration ([degraded][question][reasoning <image_restore>][clean
  picture at t = 1]); it carries no text loss.  Teacher: the understood copy in the SFT sample itself (same batch,
  detached).  The loss teaches the model to read the restoration where the bridge puts it as it reads the copy the
  answers are trained on.  Cost: each restore sample's prefix and one more image go through the model again (the
  document is counted in the micro-batch's token budget).
* Student ``"generated"`` (option): the generation span of the restored image in the SFT sample, at the flow loss's
  t (no extra document; it pulls the noised generation tokens' states towards the understood copy's).

Losses (:func:`bridge_kl`, :func:`bridge_mse`, written after CLEAR's ``per_layer_kl`` and ``final_mse``): per layer l
of the selected ones, per pair, KL(softmax(teacher) || softmax(student)) over the hidden dimension of each token,
averaged over the tokens (``batchmean``), summed over the layers with weights (l + 1) / sum (linear in depth,
normalised; CLEAR distils every 4th layer and the last, ``layer_stride`` here, default every layer of the tiny
LLM's 4), and averaged over the pairs; or the MSE between the token-mean of the final-normed last-layer states.
The per-layer states are each decoder layer's output (the residual stream before the final norm), as CLEAR's
``distill_fn`` receives them.  A pair whose teacher document had its prompt dropped for classifier-free guidance
is left out (its teacher read a null prompt).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...utils import seed_of
from ..spec import DataSource, StepOutput, register
from .sft import ClearSFTRecipe, ClearSFTRecipeConfig

__all__ = ["ClearBridgeRecipe", "ClearBridgeRecipeConfig", "bridge_kl", "bridge_mse", "layer_weights",
           "bridge_pairs", "student_sample", "BridgeEncoder", "BridgeDoc", "STUDENTS", "LOSSES"]

STUDENTS = ("clean", "generated")
LOSSES = ("kl", "mse")
STUDENT_KEY = "bridge_student"        # meta of a student document (the index of its sample's document before it)


def layer_weights(num_layers: int, stride: int = 1) -> torch.Tensor:
    """(num_layers,) float32 weights of the per-layer KL: layers stride-1, 2 stride-1, ... and always the last get
    (l + 1) / sum over those, the others 0 (CLEAR's ``distill_layer_stride``)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"layer_weights: num_layers must be an int >= 1, got {num_layers!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"layer_weights: stride must be an int >= 1, got {stride!r}")
    chosen = set(range(stride - 1, num_layers, stride)) | {num_layers - 1}
    w = torch.tensor([float(i + 1) if i in chosen else 0.0 for i in range(num_layers)])
    return w / w.sum()


def _check_pairs(student, teacher, who, dims):
    if not isinstance(student, (list, tuple)) or not isinstance(teacher, (list, tuple)):
        raise TypeError(f"{who}: student and teacher must be lists of tensors (one per pair), got "
                        f"{type(student).__name__} and {type(teacher).__name__}")
    if len(student) != len(teacher) or not student:
        raise ValueError(f"{who}: expected the same non-zero number of student and teacher tensors, got "
                         f"{len(student)} and {len(teacher)}")
    for k, (s, t) in enumerate(zip(student, teacher)):
        if not isinstance(s, torch.Tensor) or not isinstance(t, torch.Tensor) or s.dim() != dims \
                or s.shape != t.shape:
            raise ValueError(f"{who}: pair {k}: student and teacher must be {dims}-D tensors of one shape, got "
                             f"{tuple(getattr(s, 'shape', ()))} and {tuple(getattr(t, 'shape', ()))}")


def bridge_kl(student, teacher, weights: torch.Tensor) -> torch.Tensor:
    """CLEAR's per-layer KL.  student / teacher: lists (one per pair) of (num_layers, N, D) hidden states of the
    student's and the teacher's N tokens; weights (num_layers,) (:func:`layer_weights`).  Returns
    mean over pairs of sum_l w_l * (1 / N) sum_tokens KL(softmax(teacher) || softmax(student)) (float32; the
    teacher detached)."""
    _check_pairs(student, teacher, "bridge_kl", 3)
    L = student[0].shape[0]
    if not isinstance(weights, torch.Tensor) or weights.shape != (L,):
        raise ValueError(f"bridge_kl: weights must be a ({L},) tensor (one per layer), got "
                         f"{tuple(weights.shape) if isinstance(weights, torch.Tensor) else weights!r}")
    total = 0.0
    for s, t in zip(student, teacher):
        log_s = torch.log_softmax(s.float(), -1)
        log_t = torch.log_softmax(t.detach().float(), -1)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean(-1)          # (num_layers,): batchmean over tokens
        total = total + (weights.to(kl.device) * kl).sum()
    return total / len(student)


def bridge_mse(student, teacher) -> torch.Tensor:
    """CLEAR's alternative: lists (one per pair) of (N, D) last-layer (final-normed) states; mean over pairs of
    mean((mean_tokens(teacher) - mean_tokens(student))^2) (float32; the teacher detached)."""
    _check_pairs(student, teacher, "bridge_mse", 2)
    return torch.stack([((t.detach().float().mean(0) - s.float().mean(0)) ** 2).mean()
                        for s, t in zip(student, teacher)]).mean()


# ------------------------------------------------------------------------------------------------------ data
def _restore_index(items) -> int | None:
    """Index of the generated image that an understood copy of the same picture follows (a restore sample), or
    None."""
    from ...data.packing import ImageItem

    for j in range(len(items) - 1):
        a, b = items[j], items[j + 1]
        if isinstance(a, ImageItem) and isinstance(b, ImageItem) and a.role == "generate" and b.role == "understand":
            return j
    return None


def student_sample(sample):
    """The student document of a restore sample (module docstring): its items before the generated image (text
    without loss), then the understood copy's picture to understand; None for a sample without a restoration."""
    from ...data.packing import Sample, TextItem

    j = _restore_index(sample.items)
    if j is None:
        return None
    items = [TextItem(it.text) if isinstance(it, TextItem) else it for it in sample.items[:j]]
    return Sample(items + [sample.items[j + 1]], {**sample.meta, STUDENT_KEY: True})


@dataclass
class BridgeDoc:
    """An encoded restore sample and its student document: the loader counts both in the token budget."""

    doc: object
    student: object

    @property
    def length(self) -> int:
        return self.doc.length + self.student.length


class BridgeEncoder:
    """encode(sample, index, epoch seed) -> EncodedSample, or a BridgeDoc for a restore sample with student "clean"
    (picklable for loader workers)."""

    def __init__(self, spec, student: str):
        if student not in STUDENTS:
            raise ValueError(f"BridgeEncoder: student must be one of {STUDENTS}, got {student!r}")
        self.spec, self.student = spec, student

    def __call__(self, sample, index: int, seed: int):
        from ...data.packing import encode_sample

        doc = encode_sample(sample, self.spec, sample_id=int(index), seed=int(seed))
        if self.student != "clean":
            return doc
        s = student_sample(sample)
        if s is None:
            return doc
        return BridgeDoc(doc, encode_sample(s, self.spec, sample_id=int(index), seed=int(seed)))


def collate(docs):
    """Flatten BridgeDocs (each sample's document, its student right after it) and pack."""
    from ...data.packing import collate_docs

    flat = []
    for d in docs:
        flat += [d.doc, d.student] if isinstance(d, BridgeDoc) else [d]
    return collate_docs(flat)


def bridge_pairs(batch, student: str) -> list:
    """The (teacher image, student image) index pairs of a packed batch (indices into ``batch.images``), with the
    teacher's document: a list of (teacher, student, teacher_doc).  Teacher: the understood copy after a
    restore sample's generated image; student: that generated image ("generated") or the image of the student
    document right after the sample ("clean")."""
    if student not in STUDENTS:
        raise ValueError(f"bridge_pairs: student must be one of {STUDENTS}, got {student!r}")
    if len(batch.images) == 0:
        return []
    from ..policy import _docs_of_images

    roles = batch.image_spans[:, 2].tolist()
    docs = _docs_of_images(batch)
    per_doc: dict = {}
    for i, d in enumerate(docs):
        per_doc.setdefault(d, []).append(i)
    metas = batch.metas or [{} for _ in range(batch.num_docs)]
    out = []
    for d, imgs in per_doc.items():
        if metas[d].get(STUDENT_KEY):
            continue
        gen = next((k for k in range(len(imgs) - 1) if roles[imgs[k]] == 1 and roles[imgs[k + 1]] == 0), None)
        if gen is None:
            continue
        teacher = imgs[gen + 1]
        if student == "generated":
            stu = imgs[gen]
        else:
            nxt = per_doc.get(d + 1)
            if d + 1 >= len(metas) or not metas[d + 1].get(STUDENT_KEY) or not nxt:
                raise ValueError(f"bridge_pairs: document {d} restores an image but no student document follows it "
                                 f"(pack with clear_bridge.BridgeEncoder(spec, 'clean') and clear_bridge.collate)")
            stu = nxt[-1]
        if tuple(batch.image_grids[teacher].tolist()) != tuple(batch.image_grids[stu].tolist()):
            raise ValueError(f"bridge_pairs: document {d}: the teacher image's token grid "
                             f"{tuple(batch.image_grids[teacher].tolist())} differs from the student's "
                             f"{tuple(batch.image_grids[stu].tolist())}")
        out.append((teacher, stu, d))
    return out


# ------------------------------------------------------------------------------------------------------ recipe
@dataclass
class ClearBridgeRecipeConfig(ClearSFTRecipeConfig):
    """clear-sft plus CLEAR's latent bridge loss (module docstring)."""
    bridge_weight: float = 0.4        # CLEAR: 0.4
    bridge_loss: str = "kl"           # "kl": per-layer KL (CLEAR's per_layer_kl); "mse": mean-pooled last layer
    bridge_student: str = "clean"     # "clean": the clean picture at t = 1 in the restoration's slot (CLEAR);
                                      # "generated": the generation span at the flow loss's t
    bridge_layer_stride: int = 1      # KL on layers stride-1, 2 stride-1, ... and the last (CLEAR: 4 of BAGEL's 28)

    def validate(self):
        super().validate()
        from ..config import requirement

        need = requirement("recipe", self)
        need(isinstance(self.bridge_weight, (int, float)) and not isinstance(self.bridge_weight, bool)
             and self.bridge_weight >= 0, "bridge_weight", "must be a number >= 0")
        need(self.bridge_loss in LOSSES, "bridge_loss", f"must be one of {list(LOSSES)}")
        need(self.bridge_student in STUDENTS, "bridge_student", f"must be one of {list(STUDENTS)}")
        need(isinstance(self.bridge_layer_stride, int) and not isinstance(self.bridge_layer_stride, bool)
             and self.bridge_layer_stride >= 1, "bridge_layer_stride", "must be an int >= 1")
        return self


@register
class ClearBridgeRecipe(ClearSFTRecipe):
    name = "clear-bridge"
    config_class = ClearBridgeRecipeConfig
    run_defining = ClearSFTRecipe.run_defining + ("bridge_weight", "bridge_loss", "bridge_student",
                                                  "bridge_layer_stride")

    def build_data(self, cfg, model) -> DataSource:
        spec = model.pack_spec(budget=cfg.data.budget)
        return DataSource(self._dataset(cfg), BridgeEncoder(spec, cfg.recipe.bridge_student), collate)

    def describe(self, cfg) -> str:
        r = cfg.recipe
        return (f"CLEAR latent bridge ({r.bridge_loss}, student {r.bridge_student}, weight {r.bridge_weight}) + "
                + super().describe(cfg))

    def step(self, model, batch, ctx) -> StepOutput:
        from .. import policy

        bare, r = ctx.module, ctx.config.recipe
        p = bare.config.cfg_dropout if r.cfg_dropout is None else r.cfg_dropout
        inputs = policy.training_inputs(bare, batch, seed_of(ctx.seed, ctx.step, "sft-step"), p)
        pairs = bridge_pairs(batch, r.bridge_student)
        if pairs and inputs["input_ids"] is not batch.input_ids:      # leave out teachers that read a null prompt
            offs = batch.doc_offsets.tolist()
            ids, kept = batch.input_ids, inputs["input_ids"]
            pairs = [q for q in pairs if torch.equal(ids[offs[q[2]]:offs[q[2] + 1]],
                                                     kept[offs[q[2]]:offs[q[2] + 1]].to(ids.device))]
        spans = batch.image_spans.tolist()

        def rows(i):
            return torch.arange(spans[i][0], spans[i][0] + spans[i][1])

        if not pairs:
            out = model(batch, **inputs)
            bridge = out["loss"].new_zeros(())
        else:
            sel = torch.cat([torch.cat([rows(t), rows(s)]) for t, s, _ in pairs])
            sizes = [spans[t][1] for t, _, _ in pairs]
            if r.bridge_loss == "kl":
                out = model(batch, **inputs, layer_rows=sel)
                states = out["layer_hidden"]                          # (layers, R, D)
                stu, tea, off = [], [], 0
                for n in sizes:
                    tea.append(states[:, off:off + n])
                    stu.append(states[:, off + n:off + 2 * n])
                    off += 2 * n
                w = layer_weights(states.shape[0], r.bridge_layer_stride)
                bridge = bridge_kl(stu, tea, w)
            else:
                out = model(batch, **inputs, return_outputs=True)
                h = out["hidden"][sel.to(out["hidden"].device)]
                stu, tea, off = [], [], 0
                for n in sizes:
                    tea.append(h[off:off + n])
                    stu.append(h[off + n:off + 2 * n])
                    off += 2 * n
                bridge = bridge_mse(stu, tea)
        loss = out["loss"] + float(r.bridge_weight) * bridge.to(out["loss"].dtype)
        read = int((batch.image_spans[:, 2] != policy.GENERATE).sum()) if len(batch.images) else 0
        return StepOutput(loss, {"text_loss": out["text_loss"], "flow_loss": out["flow_loss"],
                                 "bridge_loss": bridge.detach()},
                          {"text_tokens": out["text_tokens"], "flow_images": out["flow_images"], "read_images": read,
                           "bridge_pairs": len(pairs)})

    def shorthands(self) -> dict:
        return {**super().shorthands(),
                "--bridge-loss": ("recipe.bridge_loss", "value", "kl (per-layer KL, CLEAR) or mse (mean-pooled last "
                                                                 "layer)"),
                "--bridge-weight": ("recipe.bridge_weight", "value", "weight of the bridge loss (CLEAR: 0.4)"),
                "--bridge-student": ("recipe.bridge_student", "value", "clean (the clean picture in the "
                                                                       "restoration's slot) or generated")}
