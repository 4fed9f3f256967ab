"""A synthetic multimodal world: procedural scenes of coloured shapes, the built-in default data of every recipe.

    world = SyntheticWorld(size=64, seed=0, max_objects=4)
    rec = world[17]                      # the same record for the same (seed, 17), nothing stored
    rec.image                            # uint8 (3, H, W)
    rec.scene["objects"]                 # kind / color / size / center / box / bbox / area per object
    rec.caption, rec.vqa                 # text; multiple-choice and short-answer questions
    rec.instances, rec.segmentation      # instance ids (H, W) and the colour-coded instance map (3, H, W) for SGT
    rec.prompt                           # a generation prompt spec ("two red circles left of a blue square")
    rec.degraded("jpeg", "mid")          # an MMD-Bench degraded copy (CLEAR)
    umm_ops.eval.check(rec.prompt, img)  # GenEval-like score of any image from its pixels (umm_ops.eval.checker)

Scenes are rendered into an instance-id map with Pillow's ImageDraw (no anti-aliasing), and the picture and the
segmentation map are both painted from that one map, so they agree pixel for pixel.  Objects never touch (a gap
of a few pixels), colours come from a palette of eight saturated colours at least ~110 apart in RGB, and
backgrounds are plain or two-tone greys, far from every palette colour; so the checker can find objects in any
image by colour distance and connected components, and tell shapes apart by matching each component against the
shapes rendered into its bounding box.

Answers (VQA, captions, prompts) are computed from the scene description; relative positions compare the centres
of the objects' pixel bounding boxes (the same quantity `check` measures on an image).
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from ..utils import optional_import, seed_of

__all__ = ["COLORS", "KINDS", "SIZES", "RELATIONS", "SyntheticWorld", "SceneRecord", "prompt_text",
           "instance_palette", "format_question", "to_samples", "MC_SUFFIX", "SA_SUFFIX", "MC_CHAIN_SUFFIX",
           "chain_answer"]

# Saturated colours, pairwise >= 110 apart in RGB and > 100 from every background grey.
COLORS = {
    "red": (215, 25, 35), "orange": (250, 125, 0), "yellow": (245, 230, 40), "green": (30, 170, 50),
    "cyan": (0, 210, 230), "blue": (35, 75, 225), "purple": (140, 30, 170), "pink": (255, 105, 200),
}
KINDS = ("circle", "square", "triangle", "star", "ring", "cross", "diamond")
_PLURAL = {k: k + ("es" if k.endswith(("ss", "sh", "ch", "x")) else "s") for k in KINDS}
# half-extent of an object's box as a fraction of the image side
SIZES = {"small": 0.09, "medium": 0.125, "large": 0.165}
RELATIONS = ("left of", "right of", "above", "below")
_NUM = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_GREYS = {"dark gray": (60, 95), "gray": (100, 150), "light gray": (155, 200)}

# the checker's tolerances (umm_ops.eval.checker), kept beside the palette and greys they are tuned against
COLOR_TOL = 80.0          # a pixel has palette colour c when c is its nearest palette colour, within this RGB
                          # distance, and nearer to c than to the grey axis (a mixed edge pixel goes to the
                          # object when it is at least about half object colour)
MIN_IOU = 0.6             # a component counts as a shape when it matches that shape's template this well
REL_MARGIN = 0.03         # relations need the centres apart by this fraction of the image side (check)
_PROMPT_REL_MARGIN = 0.1  # ... and prompts / questions are only made from relations this clear
SEGMENT_PROMPT = "Segment instances with different colors."  # SGT's instance-segmentation instruction
MC_SUFFIX = "Answer with the option's letter from the given choices directly."  # LLaVA's evaluation prompts
SA_SUFFIX = "Answer the question using a single word or phrase."
MC_CHAIN_SUFFIX = "Answer with the option, then its letter."   # vqa_chain: name the answer, then its letter


def chain_answer(item: dict) -> str:
    """The trained answer of a ``vqa_chain`` item: the option's text, then its letter in brackets (" orange (D)",
    with the space that makes the answer's word the very token of the option's word).
    Naming the read attribute first turns "which letter" into finding that word among the options and copying the
    letter before it; measured on the tiny preset (docs/results/base, stop 31) the copy was not learned in 800 steps."""
    return f" {item['answer']} ({item['answer_letter']})"   # " red": the options' own word token (world BPE)


def instance_palette(n: int) -> list:
    """n distinct non-black colours for instance ids 1..n: the PASCAL VOC colour map (bits of the id spread over
    the high bits of R, G, B), so ids never collide below 2**24 and the first ids are far apart."""
    out = []
    for i in range(1, n + 1):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


# ----------------------------------------------------------------------------------------------- drawing
def _star(n_points=5, inner=0.45):
    pts = []
    for k in range(2 * n_points):
        r = 1.0 if k % 2 == 0 else inner
        a = math.pi * k / n_points
        pts.append((r * math.sin(a), -r * math.cos(a)))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)  # stretch to fill the unit box [-1, 1]^2
    return [(2 * (x - x0) / (x1 - x0) - 1, 2 * (y - y0) / (y1 - y0) - 1) for x, y in pts]


_UNIT_POLY = {
    "triangle": [(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)],
    "diamond": [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)],
    "star": _star(),
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
}
_RING_INNER = 0.55


def _draw_shape(draw, kind: str, box, fill: int) -> None:
    """Draw `kind` filling box = (x0, y0, x1, y1) (Pillow coordinates, corners inclusive) with value `fill`."""
    x0, y0, x1, y1 = box
    cx, cy, hx, hy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if kind == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif kind == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif kind == "ring":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
        r = _RING_INNER
        draw.ellipse([cx - r * hx, cy - r * hy, cx + r * hx, cy + r * hy], fill=0)
    elif kind in _UNIT_POLY:
        draw.polygon([(cx + u * hx, cy + v * hy) for u, v in _UNIT_POLY[kind]], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; expected one of {KINDS}")


@functools.lru_cache(maxsize=4096)
def _template(kind: str, w: int, h: int) -> np.ndarray:
    """(h, w) bool mask of `kind` rendered into a w x h pixel box."""
    Image, ImageDraw = optional_import("PIL", "Image", "ImageDraw")

    im = Image.new("L", (w, h), 0)
    _draw_shape(ImageDraw.Draw(im), kind, (0, 0, w - 1, h - 1), 1)
    return np.asarray(im) > 0


def _background(bg: dict, size: int) -> np.ndarray:
    """(size, size, 3) uint8 background."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = bg["colors"][0]
    if bg["kind"] == "two_tone":
        yy, xx = np.mgrid[0:size, 0:size]
        at = bg["at"] * size
        second = {"vertical": xx >= at, "horizontal": yy >= at, "diagonal": xx + yy >= 2 * at}[bg["split"]]
        img[second] = bg["colors"][1]
    return img


def render(scene: dict):
    """Render a scene description -> (image uint8 (3, H, W), instance ids int64 (H, W), 0 = background).

    Object k (0-based in scene["objects"]) gets instance id k + 1.  Any scene dict of the same form can be
    rendered (e.g. an edited copy), as long as it has at most 255 objects."""
    Image, ImageDraw = optional_import("PIL", "Image", "ImageDraw")

    size = scene["size"]
    objs = scene["objects"]
    if len(objs) > 255:
        raise ValueError(f"render: at most 255 objects, got {len(objs)}")
    label = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(label)
    for k, o in enumerate(objs):
        _draw_shape(draw, o["kind"], o["box"], k + 1)
    inst = np.asarray(label).astype(np.int64)
    table = np.array([[0, 0, 0]] + [list(COLORS[o["color"]]) for o in objs], dtype=np.uint8)
    img = _background(scene["background"], size)
    fg = inst > 0
    img[fg] = table[inst[fg]]
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), torch.from_numpy(inst)


def segmentation_map(instances: torch.Tensor) -> torch.Tensor:
    """Instance ids (H, W) -> colour-coded map uint8 (3, H, W): instance k in instance_palette colour k, 0 black."""
    inst = instances.cpu().numpy() if isinstance(instances, torch.Tensor) else np.asarray(instances)
    n = int(inst.max()) if inst.size else 0
    table = np.array([[0, 0, 0]] + instance_palette(n), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(table[inst].transpose(2, 0, 1)))


# ----------------------------------------------------------------------------------------------- text
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(count: int, color: str | None, kind: str | None, size: str | None = None) -> str:
    noun = kind if kind is not None else "object"
    words = [w for w in ((size if size in ("small", "large") else None), color) if w]
    if count == 1:
        head = " ".join(words + [noun])
        return f"{_article(head)} {head}"
    plural = _PLURAL.get(noun, noun + "s")
    return " ".join([_NUM[count] if count < len(_NUM) else str(count)] + words + [plural])


def prompt_text(spec: dict) -> str:
    """The text of a prompt spec: {"objects": [{"count", "color", "kind"}], "relation": {"a", "rel", "b"} | None}."""
    groups = spec["objects"]
    parts = [_phrase(g["count"], g.get("color"), g.get("kind")) for g in groups]
    rel = spec.get("relation")
    if rel:
        a, b = rel["a"], rel["b"]
        rest = [p for i, p in enumerate(parts) if i not in (a, b)]
        head = f"{parts[a]} {rel['rel']} {parts[b]}"
        return " and ".join([head] + rest) if rest else head
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _center(bbox) -> tuple:
    return ((bbox[0] + bbox[2]) / 2.0, (bbox[1] + bbox[3]) / 2.0)


def _relation_holds(ca, cb, rel: str, margin: float) -> bool:
    dx, dy = cb[0] - ca[0], cb[1] - ca[1]  # a left of b <=> b's centre is further right
    return {"left of": dx > margin, "right of": -dx > margin, "above": dy > margin, "below": -dy > margin}[rel]


def _direction(ca, cb, margin: float):
    """The one clear direction of a relative to b ("left"/"right"/"above"/"below") or None."""
    dx, dy = ca[0] - cb[0], ca[1] - cb[1]
    if abs(dx) >= margin and abs(dy) <= 0.5 * abs(dx):
        return "left" if dx < 0 else "right"
    if abs(dy) >= margin and abs(dx) <= 0.5 * abs(dy):
        return "above" if dy < 0 else "below"
    return None


def format_question(item: dict, multiple_choice: bool = True, suffix: str | None = None) -> str:
    """The prompt text of a VQA item: LLaVA-style multiple choice (A-D) or short answer; ``suffix``: the closing
    instruction (default LLaVA's MC_SUFFIX / SA_SUFFIX)."""
    if multiple_choice:
        opts = "\n".join(f"{L}. {o}" for L, o in zip("ABCD", item["options"]))
        return f"{item['question']}\n{opts}\n{MC_SUFFIX if suffix is None else suffix}"
    return f"{item['question']}\n{SA_SUFFIX if suffix is None else suffix}"


# ----------------------------------------------------------------------------------------------- records
@dataclass
class SceneRecord:
    """One sample of the synthetic world (see the module docstring)."""
    index: int
    seed: int
    scene: dict
    image: torch.Tensor            # uint8 (3, H, W)
    instances: torch.Tensor        # int64 (H, W), object k has id k + 1, background 0
    segmentation: torch.Tensor     # uint8 (3, H, W), colour-coded instances, background black
    instance_colors: list          # [{"id", "object", "color": (r, g, b)}]
    caption: str
    vqa: list                      # [{"type", "question", "answer", "options", "answer_letter", "query"}]
    prompt: dict                   # {"text", "tag", "objects", "relation"}
    prompts: list = field(default_factory=list)  # every prompt spec derivable from the scene

    def degraded(self, kind: str | None = None, intensity="mid"):
        """(uint8 (3, H, W) degraded copy, kind): an MMD-Bench degradation (CLEAR) of this image, deterministic
        per (seed, index); kind=None draws one with CLEAR's weights."""
        from .degradations import degrade, sample_kind

        if kind is None:
            kind = sample_kind(torch.Generator().manual_seed(seed_of(self.seed, self.index, "degradation")))
        return degrade(self.image[None], kind, intensity, seed=self.seed, index=[self.index])[0], kind


class SyntheticWorld:
    """Indexable procedural dataset: world[i] is a SceneRecord, the same for the same (seed, i); nothing stored.

    size: image side in pixels (64-256 intended; 32-1024 accepted); max_objects: objects per scene (1..max; fewer
    when they do not fit); two_tone: fraction of two-tone backgrounds; repeat: probability that an object repeats
    the colour and shape of an earlier one (material for counting); object_scale: multiplies the objects' sizes
    (SIZES: half-sides 0.09 / 0.125 / 0.165 of the picture; 0.5-2.5, bigger objects are easier to read at 64 px);
    length: len(world)."""

    def __init__(self, size: int = 64, seed: int = 0, max_objects: int = 4, length: int = 100_000,
                 kinds=KINDS, colors=tuple(COLORS), two_tone: float = 0.4, repeat: float = 0.35,
                 object_scale: float = 1.0):
        if not isinstance(size, int) or not (32 <= size <= 1024):
            raise ValueError(f"SyntheticWorld: size must be an int in [32, 1024] (64-256 intended), got {size!r}")
        if not isinstance(max_objects, int) or not (1 <= max_objects <= 64):
            raise ValueError(f"SyntheticWorld: max_objects must be an int in [1, 64], got {max_objects!r}")
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"SyntheticWorld: length must be a non-negative int, got {length!r}")
        bad = [k for k in kinds if k not in KINDS] + [c for c in colors if c not in COLORS]
        if bad or len(kinds) < 1 or len(colors) < 4:
            raise ValueError(f"SyntheticWorld: kinds must be a non-empty subset of {KINDS} and colors at least 4 of "
                             f"{tuple(COLORS)}; got kinds={tuple(kinds)}, colors={tuple(colors)}")
        for name, p in (("two_tone", two_tone), ("repeat", repeat)):
            if not (0.0 <= p <= 1.0):
                raise ValueError(f"SyntheticWorld: {name} must be a probability in [0, 1], got {p!r}")
        if isinstance(object_scale, bool) or not isinstance(object_scale, (int, float)) or not (
                0.5 <= object_scale <= 2.5):
            raise ValueError(f"SyntheticWorld: object_scale must be a number in [0.5, 2.5], got {object_scale!r}")
        self.size, self.seed, self.max_objects, self.length = size, int(seed), max_objects, length
        self.object_scale = float(object_scale)
        self.kinds, self.colors = tuple(kinds), tuple(colors)
        self.two_tone, self.repeat = two_tone, repeat

    def __len__(self) -> int:
        return self.length

    @property
    def min_object_area(self) -> int:
        """Half the pixel area of the smallest object this world draws (its smallest size, its smallest shape):
        the checker's ``min_area`` for pictures of this world, so that fragments far smaller than any object, such
        as the confetti of an untrained generator, are not counted as objects (see :func:`umm_ops.eval.check`)."""
        h = max(3, round(min(SIZES.values()) * self.object_scale * self.size))
        return max(4, min(int(_template(k, 2 * h + 1, 2 * h + 1).sum()) for k in self.kinds) // 2)

    def _check_index(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"SyntheticWorld indices are ints, got {type(i).__name__}")
        i = int(i)
        if i < 0:
            i += self.length
        if not (0 <= i < self.length):
            raise IndexError(f"SyntheticWorld index {i} out of range for length {self.length}")
        return i

    # ---- scene description
    def scene(self, i: int) -> dict:
        """The description of scene i (objects with nominal geometry; `__getitem__` adds pixel bboxes/areas)."""
        i = self._check_index(i)
        rng = random.Random(seed_of(self.seed, i, "scene"))
        S = self.size
        if rng.random() < self.two_tone:
            names = rng.sample(list(_GREYS), 2)
            cols = [[rng.randint(*_GREYS[n])] * 3 for n in names]
            bg = {"kind": "two_tone", "names": names, "colors": cols,
                  "split": rng.choice(["vertical", "horizontal", "diagonal"]), "at": round(rng.uniform(0.3, 0.7), 3)}
        else:
            name = rng.choice(list(_GREYS))
            bg = {"kind": "plain", "names": [name], "colors": [[rng.randint(*_GREYS[name])] * 3]}
        n = rng.randint(1, self.max_objects)
        gap = 2 + 0.03 * S  # pixels between object boxes, so objects never touch
        objs, boxes = [], []
        for _ in range(n):
            if objs and rng.random() < self.repeat:
                src = rng.choice(objs)
                kind, color = src["kind"], src["color"]
            else:
                used = {(o["color"], o["kind"]) for o in objs}
                while True:
                    kind, color = rng.choice(self.kinds), rng.choice(self.colors)
                    if (color, kind) not in used or len(used) >= len(self.kinds) * len(self.colors):
                        break
            size_name = rng.choice(list(SIZES))
            for _attempt in range(60):
                # integer corners (Pillow's inclusive pixel coordinates): the object then covers exactly the
                # pixels of its shape's template rendered into its bbox
                h = max(3, round(SIZES[size_name] * self.object_scale * S))
                cx, cy = rng.randint(h + 1, S - 2 - h), rng.randint(h + 1, S - 2 - h)
                box = (cx - h, cy - h, cx + h, cy + h)
                if all(box[0] > b[2] + gap or box[2] < b[0] - gap or box[1] > b[3] + gap or box[3] < b[1] - gap
                       for b in boxes):
                    break
                if _attempt % 20 == 19 and size_name != "small":  # crowded: try smaller
                    size_name = "small"
            else:
                continue  # does not fit: the scene has fewer objects
            boxes.append(box)
            objs.append({"kind": kind, "color": color, "size": size_name,
                         "center": [cx, cy], "box": list(box)})
        return {"index": i, "seed": self.seed, "size": S, "background": bg, "objects": objs}

    # ---- full record
    def __getitem__(self, i) -> SceneRecord:
        scene = self.scene(i)
        i = scene["index"]
        image, inst = render(scene)
        inst_np = inst.numpy()
        for k, o in enumerate(scene["objects"]):
            ys, xs = np.nonzero(inst_np == k + 1)
            o["id"] = k + 1
            o["rgb"] = list(COLORS[o["color"]])
            o["area"] = int(ys.size)
            o["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        seg = segmentation_map(inst)
        pal = instance_palette(len(scene["objects"]))
        inst_colors = [{"id": k + 1, "object": k, "color": pal[k]} for k in range(len(scene["objects"]))]
        rng = random.Random(seed_of(self.seed, i, "text"))
        prompts = scene_prompts(scene)
        # prefer the more demanding prompts (GenEval's position / counting / two-object) when the scene has them
        ranked = [p for tag in ("position", "two_object", "counting", "single_object", "all")
                  for p in prompts if p["tag"] == tag]
        prompt = rng.choice([p for p in ranked if p["tag"] == ranked[0]["tag"]] if rng.random() < 0.6 else ranked)
        return SceneRecord(index=i, seed=self.seed, scene=scene, image=image, instances=inst, segmentation=seg,
                           instance_colors=inst_colors, caption=caption(scene, rng), vqa=make_vqa(scene, rng, self),
                           prompt=prompt, prompts=prompts)

    def __iter__(self):
        for i in range(self.length):
            yield self[i]

    def __repr__(self) -> str:
        return (f"SyntheticWorld(size={self.size}, seed={self.seed}, max_objects={self.max_objects}, "
                f"length={self.length})")


# ----------------------------------------------------------------------------------------------- scene -> text
def _groups(scene) -> dict:
    g: dict = {}
    for k, o in enumerate(scene["objects"]):
        g.setdefault((o["color"], o["kind"]), []).append(k)
    return g


def _unique_name(scene, k):
    """The shortest unambiguous noun phrase for object k ("the circle", "the red circle") or None."""
    objs = scene["objects"]
    o = objs[k]
    if sum(p["kind"] == o["kind"] for p in objs) == 1:
        return f"the {o['kind']}", {"kind": o["kind"]}
    if sum(p["kind"] == o["kind"] and p["color"] == o["color"] for p in objs) == 1:
        return f"the {o['color']} {o['kind']}", {"color": o["color"], "kind": o["kind"]}
    return None


def caption(scene: dict, rng: random.Random | None = None) -> str:
    objs = scene["objects"]
    bg = scene["background"]
    where = (f"a {bg['names'][0]} background" if bg["kind"] == "plain"
             else f"a background split {bg['split']}ly into {bg['names'][0]} and {bg['names'][1]}")
    if not objs:
        return f"An empty scene on {where}."
    parts = [_phrase(len(ks), c, kind, objs[ks[0]]["size"] if len(ks) == 1 else None)
             for (c, kind), ks in _groups(scene).items()]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    text = f"{listing[0].upper()}{listing[1:]} on {where}."
    S = scene["size"]
    pairs = []
    for a in range(len(objs)):
        for b in range(a + 1, len(objs)):
            na, nb = _unique_name(scene, a), _unique_name(scene, b)
            d = _direction(_center(objs[a]["bbox"]), _center(objs[b]["bbox"]), _PROMPT_REL_MARGIN * S) \
                if "bbox" in objs[a] else None
            if na and nb and d:
                pairs.append(f"{na[0][0].upper()}{na[0][1:]} is {'to the ' + d + ' of' if d in ('left', 'right') else d} "
                             f"{nb[0]}.")
    if pairs:
        text += " " + (rng.choice(pairs) if rng else pairs[0])
    return text


def _options(answer: str, pool, rng: random.Random) -> tuple:
    others = [p for p in pool if p != answer]
    opts = rng.sample(others, 3) + [answer]
    rng.shuffle(opts)
    return opts, "ABCD"[opts.index(answer)]


def make_vqa(scene: dict, rng: random.Random, world: SyntheticWorld | None = None) -> list:
    """Questions about colour, shape, count and relative position, answers computed from the scene."""
    objs = scene["objects"]
    colors = tuple(world.colors) if world else tuple(COLORS)
    kinds = tuple(world.kinds) if world else KINDS
    items = []

    def add(type_, q, ans, pool, query):
        if len(set(pool) - {ans}) < 3:
            return
        opts, letter = _options(ans, pool, rng)
        items.append({"type": type_, "question": q, "answer": ans, "options": opts, "answer_letter": letter,
                      "query": query})

    # colour of a shape that appears once
    cands = [o for o in objs if sum(p["kind"] == o["kind"] for p in objs) == 1]
    if cands:
        o = rng.choice(cands)
        add("color", f"What color is the {o['kind']}?", o["color"], colors, {"kind": o["kind"]})
    # shape of the one object of a colour
    cands = [o for o in objs if sum(p["color"] == o["color"] for p in objs) == 1]
    if cands:
        o = rng.choice(cands)
        add("shape", f"What shape is the {o['color']} object?", o["kind"], kinds, {"color": o["color"]})
    # counts: of a colour+shape, of a shape, of everything; sometimes of something absent (answer 0)
    r = rng.random()
    if r < 0.15:
        query = {"color": rng.choice(colors), "kind": rng.choice(kinds)}
    elif r < 0.65 and objs:
        o = rng.choice(objs)
        query = {"color": o["color"], "kind": o["kind"]}
    elif r < 0.85 and objs:
        query = {"kind": rng.choice(objs)["kind"]}
    else:
        query = {}
    n = sum(all(o[k] == v for k, v in query.items()) for o in objs)
    what = _PLURAL[query["kind"]] if "kind" in query else "objects"
    q = f"How many {query['color'] + ' ' if 'color' in query else ''}{what} are there?"
    hi = max(4, n + rng.randint(0, 3))
    add("count", q, str(n), [str(v) for v in range(max(0, hi - 4), hi + 1)] if hi > 4 else ["0", "1", "2", "3", "4"],
        query)
    # relative position of two uniquely named objects
    S = scene["size"]
    pairs = []
    for a in range(len(objs)):
        for b in range(len(objs)):
            if a != b:
                na, nb = _unique_name(scene, a), _unique_name(scene, b)
                d = _direction(_center(objs[a]["bbox"]), _center(objs[b]["bbox"]), _PROMPT_REL_MARGIN * S)
                if na and nb and d:
                    pairs.append((na, nb, d))
    if pairs:
        na, nb, d = rng.choice(pairs)
        q = f"Where is {na[0]} relative to {nb[0]}?"
        add("position", q, d, ["left", "right", "above", "below"], {"a": na[1], "b": nb[1]})
    return items


def scene_prompts(scene: dict) -> list:
    """Every generation prompt spec this scene satisfies, tagged like GenEval's tasks
    (single_object, two_object, counting, position) plus "all" (every group of the scene)."""
    objs = scene["objects"]
    groups = list(_groups(scene).items())
    S = scene["size"]
    out = []

    def spec(tag, gs, relation=None):
        s = {"tag": tag, "objects": [{"count": len(ks), "color": c, "kind": kd} for (c, kd), ks in gs],
             "relation": relation}
        s["text"] = prompt_text(s)
        out.append(s)

    for g in groups:
        spec("single_object" if len(g[1]) == 1 else "counting", [g])
    for x in range(len(groups)):
        for y in range(x + 1, len(groups)):
            spec("two_object", [groups[x], groups[y]])
    for x in range(len(groups)):
        for y in range(len(groups)):
            if x == y:
                continue
            for rel in RELATIONS:
                if all(_relation_holds(_center(objs[a]["bbox"]), _center(objs[b]["bbox"]), rel, _PROMPT_REL_MARGIN * S)
                       for a in groups[x][1] for b in groups[y][1]):
                    spec("position", [groups[x], groups[y]], {"a": 0, "rel": rel, "b": 1})
    if len(groups) > 2:
        spec("all", groups)
    return out


# ----------------------------------------------------------------------------------------------- to packed samples
END = "<|im_end|>"   # ends every trained answer: the model learns to stop (generate_text stops at it)


def to_samples(record: SceneRecord, tasks=("caption", "vqa", "generate", "segment"), multiple_choice: bool = True):
    """A record as umm_ops.data.packing Samples: caption (image -> caption), vqa (image + question -> answer, one
    per item; answers and captions end with END, the tokenizer's eos), generate (prompt -> image), segment (SGT:
    image + instruction -> colour-coded instance map), and,
    when asked for, degraded_vqa (CLEAR: the vqa samples on the record's degraded copy, type drawn per record)."""
    from .packing import ImageItem, Sample, TextItem

    known = {"caption", "vqa", "vqa_chain", "generate", "segment", "degraded_vqa"}
    if isinstance(tasks, str) or not set(tasks) <= known:
        raise ValueError(f"to_samples: tasks must be a collection drawn from {sorted(known)}, got {tasks!r}")

    def img(t):
        return t.float() / 127.5 - 1.0

    meta = {"source": "synthetic", "index": record.index, "seed": record.seed}
    out = []
    if "caption" in tasks:
        out.append(Sample([ImageItem(img(record.image), "understand"), TextItem("Describe the image."),
                           TextItem(record.caption + END, loss=True)], meta={**meta, "task": "caption"}))
    if "vqa" in tasks:
        for q in record.vqa:
            ans = q["answer_letter"] if multiple_choice else q["answer"]
            out.append(Sample([ImageItem(img(record.image), "understand"),
                               TextItem(format_question(q, multiple_choice)), TextItem(ans + END, loss=True)],
                              meta={**meta, "task": "vqa", "type": q["type"]}))
    if "vqa_chain" in tasks:
        for q in record.vqa:
            out.append(Sample([ImageItem(img(record.image), "understand"),
                               TextItem(format_question(q, True, MC_CHAIN_SUFFIX)),
                               TextItem(chain_answer(q) + END, loss=True)],
                              meta={**meta, "task": "vqa_chain", "type": q["type"]}))
    if "degraded_vqa" in tasks:
        degraded, kind = record.degraded()
        for q in record.vqa:
            ans = q["answer_letter"] if multiple_choice else q["answer"]
            out.append(Sample([ImageItem(img(degraded), "understand"),
                               TextItem(format_question(q, multiple_choice)), TextItem(ans + END, loss=True)],
                              meta={**meta, "task": "degraded_vqa", "type": q["type"], "degradation": kind}))
    if "generate" in tasks:
        out.append(Sample([TextItem(record.prompt["text"]), ImageItem(img(record.image), "generate")],
                          meta={**meta, "task": "generate", "prompt": record.prompt}))
    if "segment" in tasks:
        from .proxy import proxy_sample   # SGT's instance_seg proxy (umm_ops.data.proxy): one builder for both

        out.append(proxy_sample(record, "instance_seg", meta={"task": "segment"}))
    return out
