"""Samples (interleaved text and images) and their packing into span batches for the model.

A :class:`Sample` is a list of items: :class:`TextItem` (text, and whether the model is trained to produce it) and
:class:`ImageItem` (a (3, H, W) image in [-1, 1], to be understood or generated).  :func:`pack` concatenates samples
(documents) into :class:`PackedBatch` es under a token budget; :func:`unpack` gives the samples back.

Token layout of one document, item by item::

    TextItem             tokenizer.encode(text)                                   causal
    ImageItem            [<|pad|> * k] <|vision_start|>                            causal
                         <|image_pad|> * (H / patch) * (W / patch)                 "full" (understand) or
                                                                                  spec.gen_mode (generate)
                         <|vision_end|>                                           causal

``k`` pads appear only with ``spec.align``: they put the image span's first token at a multiple of ``align``
counted from the document's first token (attention kernels tile each document from its first token, so the image
block then covers whole key/query tiles).  Pads, ``<|vision_start|>`` and ``<|vision_end|>`` belong to no item:
they are never label targets (except, with ``spec.label_image_start``, the start token of a generated image).  Each TextItem is tokenized on its own (a BPE tokenizer may split differently at item
boundaries than over the joined text).

Timesteps: 1.0 (clean) for understanding images; for generated images ``spec.timestep_sampler(n, generator)``
with a generator seeded from ``(seed, sample_id)`` only, so a sample gets the same timesteps whichever batch or
worker packs it.
"""
from __future__ import annotations

import array
import bisect
import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..attention.layout import SpanLayout
from ..utils import seed_of
from .tokenizer import load_tokenizer

__all__ = ["TextItem", "ImageItem", "Sample", "PackSpec", "PackedBatch", "pack", "unpack", "UniformTimesteps",
           "LogitNormalTimesteps", "ROLES", "GEN_MODES", "chat_sample", "EncodedSample", "encode_sample",
           "collate_docs", "GreedyPacker"]

ROLES = {"understand": 0, "generate": 1}
_ROLE_NAMES = {v: k for k, v in ROLES.items()}
GEN_MODES = ("full", "noise")
IGNORE = -100


# ----------------------------------------------------------------------------------------------- items, samples
@dataclass
class TextItem:
    """A run of text; ``loss=True``: the model is trained to produce it (its tokens are label targets)."""

    text: str
    loss: bool = False

    def __post_init__(self):
        if not isinstance(self.text, str):
            raise TypeError(f"TextItem: text must be a str, got {type(self.text).__name__}")
        if not isinstance(self.loss, bool):
            raise TypeError(f"TextItem: loss must be a bool, got {type(self.loss).__name__} {self.loss!r}")


@dataclass(eq=False)
class ImageItem:
    """An image, (3, H, W) floating point in [-1, 1], to be understood (``role="understand"``) or generated
    (``role="generate"``).  Equality compares role, dtype and pixels exactly."""

    image: torch.Tensor
    role: str = "understand"

    def __post_init__(self):
        x = self.image
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ImageItem: image must be a torch.Tensor (3, H, W) in [-1, 1], got {type(x).__name__}")
        if x.dim() != 3 or x.shape[0] != 3 or x.shape[1] == 0 or x.shape[2] == 0:
            raise ValueError(f"ImageItem: image must have shape (3, H, W) with H, W > 0, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"ImageItem: image must be floating point in [-1, 1], got dtype {x.dtype}")
        lo, hi = torch.aminmax(x.detach())
        lo, hi = float(lo), float(hi)
        if not (-1.0 <= lo and hi <= 1.0):  # also false for NaN
            raise ValueError(f"ImageItem: image values must lie in [-1, 1], got min {lo} max {hi}")
        if self.role not in ROLES:
            raise ValueError(f"ImageItem: role must be 'understand' or 'generate', got {self.role!r}")

    def __eq__(self, other):
        if not isinstance(other, ImageItem):
            return NotImplemented
        return (self.role == other.role and self.image.dtype == other.image.dtype
                and self.image.shape == other.image.shape and torch.equal(self.image.cpu(), other.image.cpu()))

    __hash__ = None

    def __repr__(self) -> str:
        return f"ImageItem(image=<{tuple(self.image.shape)} {str(self.image.dtype)[6:]}>, role={self.role!r})"


@dataclass
class Sample:
    """One document: a non-empty list of TextItem / ImageItem, and free-form ``meta`` (kept through packing)."""

    items: list
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.items, (list, tuple)):
            raise TypeError(f"Sample: items must be a list of TextItem / ImageItem, got {type(self.items).__name__}")
        self.items = list(self.items)
        if not self.items:
            raise ValueError("Sample: items is empty; a sample needs at least one TextItem or ImageItem")
        for j, it in enumerate(self.items):
            if not isinstance(it, (TextItem, ImageItem)):
                raise TypeError(f"Sample: item {j} must be a TextItem or an ImageItem, got {type(it).__name__}")
        if not isinstance(self.meta, dict):
            raise TypeError(f"Sample: meta must be a dict, got {type(self.meta).__name__}")


# ----------------------------------------------------------------------------------------------- timestep samplers
class UniformTimesteps:
    """t ~ U(eps, 1 - eps) (Cheers: uniform, kept away from the ends).  ``sampler(n, generator) -> (n,) float32``."""

    def __init__(self, eps: float = 1e-3):
        if not (isinstance(eps, (int, float)) and 0.0 <= eps < 0.5):
            raise ValueError(f"UniformTimesteps: eps must be in [0, 0.5), got {eps!r}")
        self.eps = float(eps)

    def __call__(self, n: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return (self.eps + (1.0 - 2.0 * self.eps) * u).float()

    def __repr__(self) -> str:
        return f"UniformTimesteps(eps={self.eps})"


class LogitNormalTimesteps:
    """t = sigmoid(mean + std * N(0, 1)), then ``umm_ops.time_shift(t, shift)`` (BAGEL / SD3-style sampling; with
    t = 1 clean, an SD3 shift b on the noise time is ``shift = 1 / b``)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0, shift: float = 1.0):
        for name, v in (("mean", mean), ("std", std), ("shift", shift)):
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"LogitNormalTimesteps: {name} must be a finite number, got {v!r}")
        if std <= 0 or shift <= 0:
            raise ValueError(f"LogitNormalTimesteps: std and shift must be > 0, got std={std}, shift={shift}")
        self.mean, self.std, self.shift = float(mean), float(std), float(shift)

    def __call__(self, n: int, generator: torch.Generator) -> torch.Tensor:
        t = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, dtype=torch.float64))
        t = self.shift * t / (1 + (self.shift - 1) * t)  # umm_ops.time_shift's formula, on float64 host values
        return t.float()

    def __repr__(self) -> str:
        return f"LogitNormalTimesteps(mean={self.mean}, std={self.std}, shift={self.shift})"


# ----------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class PackSpec:
    """How samples become tokens.

    tokenizer: a tokenizer (``ByteTokenizer`` / ``HFTokenizer``) or a name for ``load_tokenizer`` ("byte", a folder).
    patch: pixels per LLM token side (32 = SigLIP patch 16 + 2x2 compression): an H x W image takes
        (H / patch) * (W / patch) tokens; H and W must be multiples of it.
    gen_mode: attention mode of images being generated: "full" (Cheers) or "noise" (BAGEL: hidden from every other
        token).  Understanding images are always "full".
    budget: the most tokens in one batch.
    align: None, or pad (causal, loss-free ``<|pad|>`` tokens) so every image span starts at a multiple of it from
        its document's first token (an attention tile size: 64, 128).
    timestep_sampler: ``sampler(n, generator) -> (n,) float tensor in [0, 1]`` for generated images (default
        ``UniformTimesteps()``); a class instance rather than a lambda keeps it picklable for loader workers.
    image_token_names: the (start, end, placeholder) tokens around / at an image's span: this project's
        ``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>`` by default; the released Cheers' ``<im_start>``,
        ``<im_end>``, ``<image>`` under its conventions profile (``CheersModel.pack_spec`` passes the model's).
    label_image_start: the start token of a generated image is a label target (the token before it is trained to
        predict it: the released Cheers trains ``<im_start>`` after a prompt, and never the ``<im_end>``); False
        (this project's default): no wrapper token is ever a target.
    text_only_image: None (this project's default), or ``(side, value)``: a sample without any image gets a
        side x side image of constant `value` (black in the model's pixel range) in front of its first token,
        generated at t = 0 (x_t is pure noise, the flow target x1 - noise, its head output trained), causal, no
        wrapper tokens, no label targets - what the released Cheers training does to text-only samples
        (Training/tasks/omni/train_cheers.py ``process_sample``: a 512 x 512 black image through the understanding
        preprocessing and t = 0; modeling_umm.py: its features first, causal, its head loss in the image loss).
        Classifier-free guidance dropout leaves such samples alone (released: only samples with a generated image).
    """

    tokenizer: object = "byte"
    patch: int = 32
    gen_mode: str = "full"
    budget: int = 8192
    align: int | None = None
    timestep_sampler: object = None
    image_token_names: tuple = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
    label_image_start: bool = False
    text_only_image: tuple | None = None

    def __post_init__(self):
        tok = self.tokenizer
        if isinstance(tok, str) or hasattr(tok, "__fspath__"):
            tok = load_tokenizer(tok)
            object.__setattr__(self, "tokenizer", tok)
        for attr in ("encode", "decode", "special", "pad_id", "vocab_size"):
            if not hasattr(tok, attr):
                raise TypeError(f"PackSpec: tokenizer must provide encode/decode/special/pad_id/vocab_size "
                                f"(a ByteTokenizer or HFTokenizer), got {type(tok).__name__} without {attr!r}")
        for name in ("patch", "budget"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"PackSpec: {name} must be a positive int, got {v!r}")
        if self.gen_mode not in GEN_MODES:
            raise ValueError(f"PackSpec: gen_mode must be 'full' (Cheers) or 'noise' (BAGEL), got {self.gen_mode!r}")
        if self.align is not None and (not isinstance(self.align, int) or isinstance(self.align, bool)
                                       or self.align <= 0):
            raise ValueError(f"PackSpec: align must be None or a positive int (a tile size), got {self.align!r}")
        if self.timestep_sampler is None:
            object.__setattr__(self, "timestep_sampler", UniformTimesteps())
        elif not callable(self.timestep_sampler):
            raise TypeError(f"PackSpec: timestep_sampler must be callable (n, generator) -> tensor, got "
                            f"{type(self.timestep_sampler).__name__}")
        names = tuple(self.image_token_names)
        if len(names) != 3 or not all(isinstance(n, str) for n in names):
            raise ValueError(f"PackSpec: image_token_names must be (start, end, placeholder) token names, got "
                             f"{self.image_token_names!r}")
        object.__setattr__(self, "image_token_names", names)
        object.__setattr__(self, "_ids", tuple(tok.special(n) for n in names) + (tok.pad_id,))
        if self.text_only_image is not None:
            toi = self.text_only_image
            ok = isinstance(toi, (tuple, list)) and len(toi) == 2 and isinstance(toi[0], int) and \
                not isinstance(toi[0], bool) and toi[0] > 0 and toi[0] % self.patch == 0 and \
                isinstance(toi[1], (int, float)) and not isinstance(toi[1], bool) and -1.0 <= toi[1] <= 1.0
            if not ok:
                raise ValueError(f"PackSpec: text_only_image must be None or (side, value) with side a positive "
                                 f"multiple of the patch ({self.patch} px) and value in [-1, 1], got {toi!r}")
            object.__setattr__(self, "text_only_image", (int(toi[0]), float(toi[1])))

    def image_tokens(self, height: int, width: int) -> int:
        """LLM tokens of an image of height x width pixels (the span, without the two wrapper tokens)."""
        return (height // self.patch) * (width // self.patch)


# ----------------------------------------------------------------------------------------------- packed batch
@dataclass
class PackedBatch:
    """Packed documents, all tensors on one device (CPU when packed).  ``L`` tokens, ``D`` documents.

    input_ids (L,) int64: token ids; image positions hold ``<|image_pad|>``.
    position_ids (L,) int64: 0.. per document.
    labels (L,) int64: ``labels[i] = input_ids[i + 1]`` when token i + 1 belongs to a ``TextItem(loss=True)`` of the
        same document, else -100.
    layout: ``SpanLayout`` (text causal, understanding images full, generated images ``spec.gen_mode``).
    doc_offsets (D+1,) int64; images: list of (3, H, W) tensors in order of appearance;
    image_spans (n_img, 3) int64: [start, length, role] (start global; role 0 understand, 1 generate);
    image_grids (n_img, 2) int64: token grid (gh, gw); timesteps (n_img,) float32 (1.0 = clean);
    sample_ids (D,) int64;
    text_spans (n_text, 4) int64: [start, length, loss, doc] of every TextItem (for :func:`unpack`; loss 0/1);
    metas: the samples' ``meta`` dicts;
    text_only_image (n_img,) bool: the image is the black image ``PackSpec.text_only_image`` put in front of a
        sample without images (None: no such image in the batch; :func:`unpack` drops them, CFG dropout skips them).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    layout: SpanLayout
    doc_offsets: torch.Tensor
    images: list
    image_spans: torch.Tensor
    image_grids: torch.Tensor
    timesteps: torch.Tensor
    sample_ids: torch.Tensor
    text_spans: torch.Tensor | None = None
    metas: list | None = None
    text_only_image: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_docs(self) -> int:
        return self.doc_offsets.shape[0] - 1

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        """A copy with every tensor (layout and images included) on ``device``."""
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return dataclasses.replace(
            self, input_ids=mv(self.input_ids), position_ids=mv(self.position_ids), labels=mv(self.labels),
            layout=self.layout.to(device), doc_offsets=mv(self.doc_offsets), images=[mv(x) for x in self.images],
            image_spans=mv(self.image_spans), image_grids=mv(self.image_grids), timesteps=mv(self.timesteps),
            sample_ids=mv(self.sample_ids), text_spans=mv(self.text_spans),
            metas=None if self.metas is None else list(self.metas), text_only_image=mv(self.text_only_image))


# ----------------------------------------------------------------------------------------------- one document
@dataclass
class EncodedSample:
    """One sample as tokens: what :func:`encode_sample` returns, loader workers hand back and :func:`collate_docs`
    concatenates (also used by the model's generation code).  Offsets are relative to the document's first token.
    """

    sample_id: int
    input_ids: torch.Tensor      # (n,) int64
    labels: torch.Tensor         # (n,) int64
    segments: list               # [(length, mode)]
    images: list                 # the ImageItems' tensors, in order
    image_rows: list             # [(offset in doc, length, role, gh, gw)], one per image
    timesteps: list              # floats
    text_rows: list              # [(offset in doc, length, loss)]
    meta: dict
    text_only_image: bool = False  # images[0] is the black image PackSpec.text_only_image put in front

    @property
    def length(self) -> int:
        return self.input_ids.shape[0]


def _name(sample_id: int, position: int | None) -> str:
    return f"sample {sample_id}" + ("" if position is None or position == sample_id else f" (position {position})")


def encode_sample(sample: Sample, spec: PackSpec, sample_id: int = 0, seed: int = 0,
                  position: int | None = None) -> EncodedSample:
    """Tokens, labels, segments and image rows of one sample (the per-sample half of :func:`pack`)."""
    who = _name(sample_id, position)
    if not isinstance(sample, Sample):
        raise TypeError(f"pack: {who} must be a Sample, got {type(sample).__name__}")
    tok = spec.tokenizer
    vs_id, ve_id, img_id, pad_id = spec._ids
    ids = array.array("q")       # int64 token ids, built on the host: torch.tensor(list) costs ~10x more
    loss_tok = bytearray()       # 1 where the token belongs to a loss=True TextItem
    segments: list = []
    images, image_rows, text_rows = [], [], []
    n_gen = 0
    text_only = spec.text_only_image is not None and not any(isinstance(it, ImageItem) for it in sample.items)
    if text_only:       # the released training's black image at t = 0: first, causal, no wrappers, no labels
        side, value = spec.text_only_image
        n = (side // spec.patch) ** 2
        images.append(torch.full((3, side, side), value))
        image_rows.append((0, n, ROLES["generate"], side // spec.patch, side // spec.patch))
        ids.extend(array.array("q", [img_id]) * n)
        loss_tok.extend(bytes(n))
        segments.append((n, "causal"))

    def add_causal(toks, loss):
        if not toks:
            return
        ids.extend(toks)
        loss_tok.extend(b"\x01" * len(toks) if loss else bytes(len(toks)))
        if segments and segments[-1][1] == "causal":
            segments[-1] = (segments[-1][0] + len(toks), "causal")
        else:
            segments.append((len(toks), "causal"))

    for j, it in enumerate(sample.items):
        if isinstance(it, TextItem):
            toks = tok.encode(it.text)
            text_rows.append((len(ids), len(toks), int(it.loss)))
            add_causal(toks, it.loss)
            continue
        _, H, W = it.image.shape
        if H % spec.patch or W % spec.patch:
            raise ValueError(f"pack: {who} item {j}: image of {H}x{W} pixels is not a multiple of the patch "
                             f"({spec.patch} pixels per token side); resize or crop it to a multiple of {spec.patch}")
        gh, gw = H // spec.patch, W // spec.patch
        n = gh * gw
        k = (-(len(ids) + 1)) % spec.align if spec.align else 0
        add_causal([pad_id] * k, False)
        add_causal([vs_id], spec.label_image_start and it.role == "generate")
        image_rows.append((len(ids), n, ROLES[it.role], gh, gw))
        images.append(it.image)
        ids.extend(array.array("q", [img_id]) * n)
        loss_tok.extend(bytes(n))
        segments.append((n, "full" if it.role == "understand" else spec.gen_mode))
        add_causal([ve_id], False)
        n_gen += it.role == "generate"
    if len(ids) == (image_rows[0][1] if text_only else 0):
        raise ValueError(f"pack: {who} produces no tokens (its text items are empty)")

    timesteps = [0.0 if text_only and k == 0 else 1.0 for k in range(len(images))]
    if n_gen:
        g = torch.Generator().manual_seed(seed_of(int(seed), int(sample_id), "timesteps"))
        t = spec.timestep_sampler(n_gen, g)
        if not isinstance(t, torch.Tensor) or t.shape != (n_gen,) or not t.is_floating_point():
            raise TypeError(f"pack: timestep_sampler({n_gen}, generator) must return a ({n_gen},) float tensor, got "
                            f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
        if not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError(f"pack: timestep_sampler returned values outside [0, 1] for {who}: {t.tolist()}")
        gen_t = iter(t.tolist())
        timesteps = [next(gen_t) if row[2] == ROLES["generate"] else 1.0 for row in image_rows]
    # (a text-only sample has no other image, so n_gen == 0 there and its black image keeps t = 0)

    input_ids = torch.frombuffer(ids, dtype=torch.int64)  # shares (and keeps alive) the array's memory
    loss_mask = torch.frombuffer(loss_tok, dtype=torch.bool)
    labels = torch.full_like(input_ids, IGNORE)
    labels[:-1] = torch.where(loss_mask[1:], input_ids[1:], IGNORE)
    return EncodedSample(int(sample_id), input_ids, labels, segments, images, image_rows, timesteps, text_rows,
                         dict(sample.meta), text_only)


def collate_docs(docs: list) -> PackedBatch:
    """Concatenate encoded documents into one :class:`PackedBatch` (the per-batch half of :func:`pack`)."""
    if not docs:
        raise ValueError("collate_docs: expected at least one document, got none")
    lengths = [d.length for d in docs]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    L = offsets[-1]
    doc_offsets = torch.tensor(offsets, dtype=torch.int64)
    image_rows = [(o + r[0], r[1], r[2], r[3], r[4]) for o, d in zip(offsets, docs) for r in d.image_rows]
    text_rows = [(o + r[0], r[1], r[2], k) for k, (o, d) in enumerate(zip(offsets, docs)) for r in d.text_rows]
    img = torch.tensor(image_rows, dtype=torch.int64).reshape(-1, 5)
    toi = [k == 0 and d.text_only_image for d in docs for k in range(len(d.images))]
    return PackedBatch(
        input_ids=torch.cat([d.input_ids for d in docs]),
        # per-document aranges: repeat_interleave was 10-100x slower here (its thread pool, on a busy 2-core CPU)
        position_ids=torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths]),
        labels=torch.cat([d.labels for d in docs]),
        layout=SpanLayout.from_segments([d.segments for d in docs]),
        doc_offsets=doc_offsets,
        images=[x for d in docs for x in d.images],
        image_spans=img[:, :3].contiguous(),
        image_grids=img[:, 3:].contiguous(),
        timesteps=torch.tensor([t for d in docs for t in d.timesteps], dtype=torch.float32),
        sample_ids=torch.tensor([d.sample_id for d in docs], dtype=torch.int64),
        text_spans=torch.tensor(text_rows, dtype=torch.int64).reshape(-1, 4),
        metas=[d.meta for d in docs],
        text_only_image=torch.tensor(toi, dtype=torch.bool) if any(toi) else None,
    )


class GreedyPacker:
    """Order-preserving greedy grouping under a token budget: ``add(doc)`` returns the finished group (a list of
    documents) when ``doc`` does not fit in the open one, else None; ``flush()`` returns the last group."""

    def __init__(self, budget: int):
        self.budget = budget
        self.open: list = []
        self.used = 0

    def add(self, doc: EncodedSample, position: int | None = None):
        n = doc.length
        if n > self.budget:
            raise ValueError(f"pack: {_name(doc.sample_id, position)} needs {n} tokens, more than the budget of "
                             f"{self.budget} tokens per batch (samples are never split: raise the budget or "
                             f"shorten the sample)")
        done = None
        if self.used + n > self.budget:
            done, self.open, self.used = self.open, [], 0
        self.open.append(doc)
        self.used += n
        return done

    def flush(self):
        done, self.open, self.used = self.open, [], 0
        return done or None


def pack(samples, spec: PackSpec, seed: int = 0, sample_ids=None) -> list:
    """Pack samples, in order, into batches of at most ``spec.budget`` tokens (greedy; a sample is never split).

    ``sample_ids`` (default ``range(len(samples))``) name the samples in errors and ``PackedBatch.sample_ids``, and
    seed each sample's generated-image timesteps together with ``seed``.
    """
    if not isinstance(spec, PackSpec):
        raise TypeError(f"pack: spec must be a PackSpec, got {type(spec).__name__}")
    if not isinstance(samples, (list, tuple)):
        raise TypeError(f"pack: samples must be a list of Sample, got {type(samples).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"pack: seed must be an int, got {type(seed).__name__}")
    if sample_ids is None:
        sample_ids = range(len(samples))
    else:
        sample_ids = [int(i) for i in sample_ids]
        if len(sample_ids) != len(samples):
            raise ValueError(f"pack: sample_ids must have one id per sample: {len(samples)} samples, "
                             f"{len(sample_ids)} ids")
    packer, out = GreedyPacker(spec.budget), []
    for pos, (s, sid) in enumerate(zip(samples, sample_ids)):
        group = packer.add(encode_sample(s, spec, sid, seed, position=pos), position=pos)
        if group:
            out.append(collate_docs(group))
    last = packer.flush()
    if last:
        out.append(collate_docs(last))
    return out


def unpack(batch: PackedBatch, tokenizer, image_token: str | None = None) -> list:
    """The samples of a packed batch (text decoded with ``tokenizer``; images are the batch's tensors).
    image_token: the placeholder name at image positions (``PackSpec.image_token_names[2]``); default: whichever of
    this project's ``<|image_pad|>`` and the released Cheers' ``<image>`` the spans hold."""
    if not isinstance(batch, PackedBatch):
        raise TypeError(f"unpack: expected a PackedBatch, got {type(batch).__name__}")
    if batch.text_spans is None:
        raise ValueError("unpack: the batch has no text_spans (it was not made by pack); cannot recover text items")
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    b = batch.to("cpu")
    ids = b.input_ids.tolist()
    offs = b.doc_offsets.tolist()
    names = (image_token,) if image_token is not None else ("<|image_pad|>", "<image>")
    known = {}
    for name in names:
        try:
            known[tokenizer.special(name)] = name
        except (KeyError, ValueError):
            if image_token is not None:
                raise ValueError(f"unpack: the tokenizer has no special token {image_token!r}") from None
    texts = b.text_spans.tolist()
    imgs = b.image_spans.tolist()
    if len(imgs) != len(b.images):
        raise ValueError(f"unpack: {len(imgs)} image spans but {len(b.images)} images")
    metas = b.metas if b.metas is not None else [{} for _ in range(len(offs) - 1)]
    per_doc = [[] for _ in range(len(offs) - 1)]
    for i, (start, _, _, d) in enumerate(texts):
        per_doc[d].append((start, 0, i))
    added = b.text_only_image.tolist() if b.text_only_image is not None else [False] * len(imgs)
    for i, (start, _, _) in enumerate(imgs):
        if not added[i]:      # the packer's black image of a text-only sample is no item of it
            per_doc[bisect.bisect_right(offs, start) - 1].append((start, 1, i))
    samples = []
    for d, rows in enumerate(per_doc):
        # an image span always follows a <|vision_start|> that is in no item, so a text and an image never share a
        # start; several empty texts may, and the stable sort keeps their order
        items = []
        for start, kind, i in sorted(rows, key=lambda x: (x[0], x[1])):
            if kind == 0:
                n, loss = texts[i][1], texts[i][2]
                items.append(TextItem(tokenizer.decode(ids[start:start + n]), loss=bool(loss)))
            else:
                n, role = imgs[i][1], imgs[i][2]
                span = set(ids[start:start + n])
                if len(span) != 1 or next(iter(span)) not in known:
                    raise ValueError(f"unpack: image span {i} [{start}, {start + n}) does not hold one placeholder "
                                     f"id of {sorted(known.values())}")
                items.append(ImageItem(b.images[i], role=_ROLE_NAMES[role]))
        samples.append(Sample(items, dict(metas[d])))
    return samples


def chat_sample(messages, add_generation_prompt: bool = False, loss_roles=("assistant",), meta=None) -> Sample:
    """A :class:`Sample` from chat messages, laid out as :func:`~umm_ops.data.tokenizer.chat_template` writes them
    (``<|im_start|>{role}\\n{content}<|im_end|>\\n``) with the images as items instead of ``<image>`` markers.

    Content: a str or a list of parts (str, ``{"type": "text", "text": ...}``, an image tensor or
    ``{"type": "image", "image": tensor}``).  Images in a message of a role in ``loss_roles`` are generated
    (``role="generate"``), all others understood.  The content and closing ``<|im_end|>`` of messages of a role in
    ``loss_roles`` carry the loss; role headers, other messages and the trailing newline do not.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError(f"chat_sample: messages must be a non-empty list of {{'role', 'content'}} dicts, got "
                        f"{messages!r:.80}")
    items: list = []

    def text(t, loss):
        if not t:
            return
        if items and isinstance(items[-1], TextItem) and items[-1].loss == loss:
            items[-1] = TextItem(items[-1].text + t, loss)
        else:
            items.append(TextItem(t, loss))

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"chat_sample: message {i} must be a dict with a str 'role' and a 'content', got "
                             f"{m!r:.80}")
        train = m["role"] in loss_roles
        text(f"<|im_start|>{m['role']}\n", False)
        parts = [m["content"]] if isinstance(m["content"], str) else m["content"]
        if not isinstance(parts, (list, tuple)):
            raise TypeError(f"chat_sample: message {i} content must be a str or a list of parts, got "
                            f"{type(parts).__name__}")
        for j, part in enumerate(parts):
            if isinstance(part, dict) and part.get("type") == "text":
                part = part.get("text")
            elif isinstance(part, dict) and part.get("type") == "image":
                part = part.get("image")
            if isinstance(part, str):
                text(part, train)
            elif isinstance(part, torch.Tensor):
                items.append(ImageItem(part, "generate" if train else "understand"))
            else:
                raise TypeError(f"chat_sample: message {i} part {j} must be text or an image tensor, got "
                                f"{type(part).__name__}")
        text("<|im_end|>", train)
        text("\n", False)
    if add_generation_prompt:
        text("<|im_start|>assistant\n", False)
    return Sample(items, dict(meta or {}))
