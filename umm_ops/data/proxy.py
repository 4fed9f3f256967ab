"""SGT's generative proxy tasks (papers.md section 3) on the synthetic world: an image to understand, an instruction,
and a target image to generate (flow loss on the target only) - image -> target as an editing sample.

    from umm_ops.data.proxy import PROXIES, proxy_pair, proxy_sample
    src, tgt = proxy_pair(world[17], "edge")                  # uint8 (3, H, W) each
    sample = proxy_sample(world[17], "instance_seg")         # [picture (understand)] [instruction] [map (generate)]

The hierarchy, from low-level to semantic (what the input is -> what the target is):

    reconstruction    the picture                     -> the picture
    denoising         the picture + Gaussian noise      -> the picture  (degradations "gaussian_noise", mid: std 34)
    deblurring        the picture defocused             -> the picture  (degradations "lens_blur", mid)
    super_resolution  the picture at 1/4 side, upsampled (nearest) back -> the picture
    inpainting        the picture with a grey hole (a rectangle, 1/4-1/2 of each side, drawn per sample) -> the picture
    edge              the picture -> its edge map: white where the clean picture changes, on black.  OpenCV is
                      not a dependency, so this is a Sobel edge map (3x3 Sobel on each RGB channel, replicate
                      padding; a pixel is an edge when the largest channel's gradient magnitude exceeds
                      EDGE_THRESHOLD); the world's pictures are piecewise constant, so the edges are exactly the
                      pixels within one pixel of an object / background boundary
    semantic_seg      the picture -> every object painted in its shape kind's colour (SEMANTIC_COLORS: the VOC
                      colour map indexed by the kind's place in synthetic.KINDS), background black
    instance_seg      the picture -> the colour-coded instance map (record.segmentation: instance k in VOC colour
                      k, background black) - the SFT task ``segment`` is this sample
    referring_seg     the picture + "Segment the red circle." (an object of the scene, drawn per sample, named by the
                      colour and shape the captions use; "Segment every red circle." when several match) -> white
                      where the named objects are, black elsewhere.  A scene without objects names a random
                      (colour, shape) and its target is all black.  On COCO-style data the name is a category of the
                      picture's instances ("Segment every dog.": every instance of it).

A user's COCO-style data (:class:`umm_ops.data.CocoReader`) gives the same tasks through :func:`coco_proxy_record`:
the picture resized to a square (bicubic), its instance map resized with nearest neighbours (so every pixel keeps an
instance id) and coloured as the reader colours it; semantic_seg paints each instance in the VOC colour of its
category's place among the file's categories (sorted by id).

The instruction of a sample: :func:`proxy_instruction` (PROXY_PROMPTS[proxy], filled in for referring_seg).

Randomness (noise, the hole, the referred object) is drawn from ``seed_of(seed, record.index, proxy, draw)``: the same sample for the
same (record, draw) in any process.  The degradations come from :mod:`umm_ops.data.degradations`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils import generator, seed_of

__all__ = ["PROXIES", "PROXY_PROMPTS", "EDGE_THRESHOLD", "SEMANTIC_COLORS", "proxy_pair", "proxy_sample",
           "edge_map", "semantic_map", "check_proxy", "PictureRecord", "coco_proxy_record", "proxy_instruction"]

PROXIES = ("reconstruction", "denoising", "deblurring", "super_resolution", "inpainting", "edge", "semantic_seg",
           "instance_seg", "referring_seg")


def _prompts() -> dict:
    from .synthetic import SEGMENT_PROMPT

    return {"reconstruction": "Reconstruct the image.",
            "denoising": "Remove the noise from the image.",
            "deblurring": "Remove the blur from the image.",
            "super_resolution": "Increase the resolution of the image.",
            "inpainting": "Fill in the missing region of the image.",
            "edge": "Draw the edge map of the image.",
            "semantic_seg": "Segment the image with a different color for each kind of shape.",
            "instance_seg": SEGMENT_PROMPT,
            # per sample: "Segment the {what}." ("Segment every {what}." when several objects match); this entry is
            # the template (proxy_instruction fills it)
            "referring_seg": "Segment the {what}."}


PROXY_PROMPTS = _prompts()
EDGE_THRESHOLD = 16.0      # Sobel magnitude (0..255 pixel scale, kernel weights 1-2-1: a step of s gives 4 s)
DEGRADE = {"denoising": ("gaussian_noise", "mid"), "deblurring": ("lens_blur", "mid")}
SR_FACTOR = 4


def _semantic_colors() -> dict:
    from .synthetic import KINDS, instance_palette

    return {k: c for k, c in zip(KINDS, instance_palette(len(KINDS)))}


SEMANTIC_COLORS = _semantic_colors()


def check_proxy(proxy) -> str:
    """`proxy` if it names a proxy task, else a ValueError naming the choices."""
    if proxy not in PROXIES:
        raise ValueError(f"unknown proxy task {proxy!r}; expected one of {', '.join(PROXIES)}")
    return proxy


def edge_map(image: torch.Tensor, threshold: float = EDGE_THRESHOLD) -> torch.Tensor:
    """uint8 (3, H, W) picture -> uint8 (3, H, W) Sobel edge map (255 on edges, 0 elsewhere; module docstring)."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"edge_map: expected a uint8 tensor (3, H, W), got "
                         f"{(tuple(image.shape), image.dtype) if isinstance(image, torch.Tensor) else type(image)}")
    x = F.pad(image.float()[:, None], (1, 1, 1, 1), mode="replicate")          # (3, 1, H+2, W+2)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    gx = F.conv2d(x, kx.view(1, 1, 3, 3))
    gy = F.conv2d(x, kx.t().contiguous().view(1, 1, 3, 3))
    mag = (gx * gx + gy * gy).sqrt().amax(0)[0]                                 # (H, W)
    e = (mag > threshold).to(torch.uint8) * 255
    return e[None].expand(3, -1, -1).contiguous()


def semantic_map(record) -> torch.Tensor:
    """uint8 (3, H, W): each object's pixels in its kind's SEMANTIC_COLORS colour, background black."""
    inst = record.instances
    out = torch.zeros((3,) + tuple(inst.shape), dtype=torch.uint8)
    for k, o in enumerate(record.scene["objects"]):
        m = inst == k + 1
        out[:, m] = torch.tensor(SEMANTIC_COLORS[o["kind"]], dtype=torch.uint8)[:, None]
    return out


def _hole(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    _, H, W = image.shape
    h = int(torch.randint(H // 4, H // 2 + 1, (1,), generator=g))
    w = int(torch.randint(W // 4, W // 2 + 1, (1,), generator=g))
    y = int(torch.randint(0, H - h + 1, (1,), generator=g))
    x = int(torch.randint(0, W - w + 1, (1,), generator=g))
    out = image.clone()
    out[:, y:y + h, x:x + w] = 128
    return out


class PictureRecord:
    """A picture that is not a SyntheticWorld record, as proxy_pair reads it: index (seeds the draws), seed,
    image uint8 (3, H, W), segmentation (the instance map, uint8 (3, H, W)), semantic (the category map), source."""

    def __init__(self, index: int, seed: int, image, segmentation, semantic, source: str, instances=None,
                 names=()):
        self.index, self.seed, self.image = int(index), int(seed), image
        self.segmentation, self.semantic, self.source = segmentation, semantic, source
        self.instances, self.names = instances, list(names)   # int64 (H, W) ids (k + 1), and instance k's name


def coco_proxy_record(rec: dict, size: int, index: int, seed: int, categories: dict) -> PictureRecord:
    """A CocoReader record -> PictureRecord at (size, size) (module docstring).  categories: the reader's
    {category id: name}, for the semantic colours; index: the number that seeds this sample's draws."""
    from .synthetic import instance_palette

    if not isinstance(rec, dict) or rec.get("image") is None or "instances" not in rec:
        raise TypeError("coco_proxy_record: expected a CocoReader record with its image (load_images=True)")
    from ..model.profile import square_resize

    img = (square_resize(rec["image"].permute(1, 2, 0).contiguous().numpy(), size) * 255).round().to(torch.uint8)
    inst = F.interpolate(rec["instances"][None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
    n = len(rec["instance_colors"])
    table = torch.tensor([[0, 0, 0]] + instance_palette(n), dtype=torch.uint8)
    try:
        ids = sorted(categories)
    except TypeError:      # mixed id types: a stable order all the same
        ids = sorted(categories, key=str)
    place = {c: k + 1 for k, c in enumerate(ids)}
    cat_pal = instance_palette(max(len(place), 1))
    sem = torch.tensor([[0, 0, 0]] + [cat_pal[place[c["category_id"]] - 1] if c.get("category_id") in place
                                      else (255, 255, 255) for c in rec["instance_colors"]], dtype=torch.uint8)
    return PictureRecord(index, seed, img, table[inst].permute(2, 0, 1).contiguous(),
                         sem[inst].permute(2, 0, 1).contiguous(), source=str(rec.get("source")), instances=inst,
                         names=[c["category"] for c in rec["instance_colors"]])


def _referring(record, s: int, draw: int) -> tuple:
    """(the referred object's words, the instance ids it names) of a referring_seg sample (module docstring)."""
    g = generator(s, record.index, "referring_seg", draw)
    if isinstance(record, PictureRecord):
        names = record.names
        if not names:
            raise ValueError(f"referring_seg: picture {record.index} of {record.source} has no instance to refer to")
        what = names[int(torch.randint(len(names), (1,), generator=g))]
        return what, [k + 1 for k, n in enumerate(names) if n == what]
    objs = record.scene["objects"]
    if not objs:
        from .synthetic import COLORS, KINDS

        c = list(COLORS)[int(torch.randint(len(COLORS), (1,), generator=g))]
        k = KINDS[int(torch.randint(len(KINDS), (1,), generator=g))]
        return f"{c} {k}", []
    o = objs[int(torch.randint(len(objs), (1,), generator=g))]
    return f"{o['color']} {o['kind']}", [j + 1 for j, p in enumerate(objs)
                                         if (p["color"], p["kind"]) == (o["color"], o["kind"])]


def proxy_instruction(record, proxy: str, seed: int | None = None, draw: int = 0) -> str:
    """The instruction of a proxy sample: PROXY_PROMPTS[proxy]; for referring_seg the referred object's sentence,
    drawn as :func:`proxy_pair` draws its target."""
    check_proxy(proxy)
    if proxy != "referring_seg":
        return PROXY_PROMPTS[proxy]
    what, ids = _referring(record, record.seed if seed is None else int(seed), draw)
    return f"Segment every {what}." if len(ids) > 1 else PROXY_PROMPTS[proxy].format(what=what)


def proxy_pair(record, proxy: str, seed: int | None = None, draw: int = 0) -> tuple:
    """(input uint8 (3, H, W), target uint8 (3, H, W)) of a proxy task for a SyntheticWorld record (module
    docstring).  seed: of the random draws (default the record's world seed); draw: which draw (several samples of
    one record)."""
    check_proxy(proxy)
    img = record.image
    s = record.seed if seed is None else int(seed)
    if proxy == "reconstruction":
        return img, img
    if proxy in DEGRADE:
        from .degradations import degrade

        kind, level = DEGRADE[proxy]
        # one generator per (seed, index, kind) inside degrade: the draw enters through the seed
        return degrade(img[None], kind, level, seed=seed_of(s, proxy, draw), index=[record.index])[0], img
    if proxy == "super_resolution":
        _, H, W = img.shape
        small = F.interpolate(img[None].float(), size=(H // SR_FACTOR, W // SR_FACTOR), mode="area")
        up = F.interpolate(small, size=(H, W), mode="nearest")
        return up.round().clamp(0, 255).to(torch.uint8)[0], img
    if proxy == "inpainting":
        return _hole(img, generator(s, record.index, proxy, draw)), img
    if proxy == "edge":
        return img, edge_map(img)
    if proxy == "semantic_seg":
        return img, record.semantic if isinstance(record, PictureRecord) else semantic_map(record)
    if proxy == "referring_seg":
        _, ids = _referring(record, s, draw)
        mask = torch.isin(record.instances, torch.tensor(ids, dtype=torch.long))
        return img, (mask.to(torch.uint8) * 255)[None].expand(3, -1, -1).contiguous()
    return img, record.segmentation          # instance_seg


def proxy_sample(record, proxy: str, seed: int | None = None, draw: int = 0, meta: dict | None = None):
    """The proxy task as a packing Sample: [input (understand, no loss)] [its instruction (no loss;
    :func:`proxy_instruction`)] [target (generate: the flow loss)]."""
    from .packing import ImageItem, Sample, TextItem

    src, tgt = proxy_pair(record, proxy, seed, draw)
    m = {"source": getattr(record, "source", "synthetic"), "index": record.index, "seed": record.seed,
         "task": "proxy", "proxy": proxy}
    m.update(meta or {})
    return Sample([ImageItem(src.float() / 127.5 - 1.0, "understand"), TextItem(proxy_instruction(record, proxy, seed,
                                                                                                  draw)),
                   ImageItem(tgt.float() / 127.5 - 1.0, "generate")], meta=m)
