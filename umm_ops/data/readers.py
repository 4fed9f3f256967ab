"""Readers for the dataset formats people already have.  Each is an iterable of record dicts with a decoded image
(uint8 (3, H, W) torch tensor) and text:

    LlavaReader("llava_v1_5_mix665k.json", image_root="images/")   # LLaVA conversation JSON
    CaptionReader("captions.jsonl")                                 # {"image": path, "caption": ...} per line
    WebDatasetReader("shards/train-{0000..0099}.tar")               # key.jpg/png + key.txt/json, grouped by key
    CocoReader("instances_val2017.json", image_dir="val2017/")      # instances -> colour-coded instance maps
    VQAReader("mmbench_dev_en.tsv")                                 # question / options / answer, random access

Every record names where it came from ("source": file, "index" or "key").  A bad record (missing image file, bad
JSON line, undecodable image, malformed fields) raises BadRecord naming the file and the record; with
skip_bad=True it is skipped instead and counted in `reader.skipped` (its message kept in `reader.errors`).
Problems with the whole input (a missing annotation file, a JSON file that does not parse) always raise.

COCO segmentations: polygons are rasterised with Pillow (which fills the boundary pixels, so masks can be a pixel
wider at the edges than pycocotools' rasterisation); RLE, both the uncompressed form ({"counts": [ints]}) and
the compressed string form of the COCO API (6-bit characters, delta-coded runs), is decoded here (no pycocotools).
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import Counter

import numpy as np
import torch

from ..utils import not_a_file, optional_import
from .mmd_bench import BadRecord

__all__ = ["BadRecord", "LlavaReader", "CaptionReader", "WebDatasetReader", "CocoReader", "VQAReader", "vqa_fields",
           "decode_image", "rle_decode", "rle_counts_from_string", "expand_shards"]

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def decode_image(src, where: str) -> torch.Tensor:
    """A file path or encoded bytes -> uint8 (3, H, W) RGB tensor; BadRecord naming `where` if it cannot be."""
    Image = optional_import("PIL", "Image")

    if isinstance(src, str) and not_a_file(src):
        raise BadRecord(f"{where}: image file {src!r} {not_a_file(src)}")
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as im:
            arr = np.asarray(im.convert("RGB"))  # convert() decodes fully: truncated files fail here
    except Exception as e:  # PIL.UnidentifiedImageError, OSError (truncated), ...
        what = f"image file {src!r}" if isinstance(src, str) else "image bytes"
        raise BadRecord(f"{where}: cannot decode {what} ({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class _Reader:
    """Iteration with the skip-and-count policy; subclasses yield records or BadRecord instances from _scan()."""

    def __init__(self, skip_bad: bool = False):
        self.skip_bad = bool(skip_bad)
        self.skipped = 0
        self.errors: list = []

    def _scan(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self):
        self.skipped, self.errors = 0, []
        for item in self._scan():
            if isinstance(item, BadRecord):
                if not self.skip_bad:
                    raise item
                self.skipped += 1
                self.errors.append(str(item))
                continue
            yield item

    def cyclic(self, r: int):
        """Record ``r mod len(self)`` of a random-access reader (a training stream longer than the file cycles
        through it); an unusable one raises BadRecord, or with skip_bad the next usable one is taken."""
        n = len(self)
        for j in range(n):
            try:
                return self[(int(r) + j) % n]
            except BadRecord:
                if not self.skip_bad:
                    raise
        raise BadRecord(f"{self.path}: none of its {n} records can be used (skip_bad)")


def _require_file(path: str, what: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what}: expected a file path, got {type(path).__name__}")
    path = os.fspath(path)
    why = not_a_file(path)
    if why:
        raise FileNotFoundError(f"{what}: {path!r} {why}")
    return path


def _json_list(path: str, what: str) -> list:
    """A JSON file holding a list; BadRecord naming the file when it does not parse or is not a list."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise BadRecord(f"{path}: bad JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, list):
        raise BadRecord(f"{path}: expected a JSON list of {what}, got {type(data).__name__}")
    return data


def _resolve(root: str, p: str) -> str:
    return p if os.path.isabs(p) else os.path.join(root, p)


# ----------------------------------------------------------------------------------------------- LLaVA
_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class LlavaReader(_Reader):
    """LLaVA-style conversation JSON: a list of {"id", "image" (path or list of paths; optional for text-only
    samples), "conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}]}.

    Records: {"source", "index", "key" (the id), "image" (first image or None), "images", "conversations":
    [{"role": "user"|"assistant"|"system", "text"}], "text" (the turns joined by newlines)}.  A record whose text
    has more "<image>" placeholders than it has images is bad."""

    def __init__(self, path, image_root: str | None = None, skip_bad: bool = False):
        super().__init__(skip_bad)
        self.path = _require_file(path, "LlavaReader")
        self.image_root = image_root if image_root is not None else os.path.dirname(os.path.abspath(self.path))

    def _scan(self):
        for n, rec in enumerate(_json_list(self.path, "records")):
            where = f"{self.path}: record {n}" + (f" (id {rec.get('id')!r})" if isinstance(rec, dict) and "id" in rec
                                                  else "")
            try:
                yield self._record(n, rec, where)
            except BadRecord as e:
                yield e

    def _record(self, n, rec, where):
        if not isinstance(rec, dict):
            raise BadRecord(f"{where}: expected an object, got {type(rec).__name__}")
        conv = rec.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise BadRecord(f"{where}: 'conversations' must be a non-empty list, got {conv!r:.80}")
        turns = []
        for t, turn in enumerate(conv):
            if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
                raise BadRecord(f"{where}: turn {t} must be {{'from': one of {sorted(_ROLES)}, 'value': str}}, "
                                f"got {turn!r:.80}")
            turns.append({"role": _ROLES[turn["from"]], "text": turn["value"]})
        img = rec.get("image")
        paths = [] if img is None else [img] if isinstance(img, str) else img
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise BadRecord(f"{where}: 'image' must be a path or a list of paths, got {img!r:.80}")
        n_tokens = sum(t["text"].count("<image>") for t in turns)
        if n_tokens > len(paths):
            raise BadRecord(f"{where}: {n_tokens} '<image>' placeholders but {len(paths)} image(s)")
        images = [decode_image(_resolve(self.image_root, p), where) for p in paths]
        return {"source": self.path, "index": n, "key": rec.get("id", n), "image": images[0] if images else None,
                "images": images, "conversations": turns, "text": "\n".join(t["text"] for t in turns)}


# ----------------------------------------------------------------------------------------------- caption JSONL
class CaptionReader(_Reader):
    """Image-caption JSONL: one {"image": path, "caption": text} per line (paths relative to image_root, by
    default the file's folder).  Records: {"source", "index" (line number - 1), "key", "image", "text", "meta"
    (the other fields)}."""

    def __init__(self, path, image_root: str | None = None, skip_bad: bool = False, text_key: str = "caption"):
        super().__init__(skip_bad)
        self.path = _require_file(path, "CaptionReader")
        self.image_root = image_root if image_root is not None else os.path.dirname(os.path.abspath(self.path))
        self.text_key = text_key

    def _scan(self):
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                where = f"{self.path}: line {n + 1}"
                try:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise BadRecord(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
                    if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) \
                            or not isinstance(rec.get(self.text_key), str):
                        raise BadRecord(f"{where}: expected an object with an 'image' path and a "
                                        f"{self.text_key!r} string, got {line.strip()[:80]!r}")
                    image = decode_image(_resolve(self.image_root, rec["image"]), where)
                    meta = {k: v for k, v in rec.items() if k not in ("image", self.text_key)}
                    yield {"source": self.path, "index": n, "key": rec.get("id", rec["image"]), "image": image,
                           "text": rec[self.text_key], "meta": meta}
                except BadRecord as e:
                    yield e


# ----------------------------------------------------------------------------------------------- WebDataset
def expand_shards(spec) -> list:
    """Shard list from a path, a list of paths, or WebDataset's brace notation ("a-{000..009}.tar", "{a,b}.tar")."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in expand_shards(s)]
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"WebDatasetReader: shards must be a path, a brace pattern or a list, got {type(spec).__name__}")
    spec = os.fspath(spec)
    m = re.search(r"\{([^{}]*)\}", spec)
    if not m:
        return [spec]
    head, body, tail = spec[:m.start()], m.group(1), spec[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.group(1), r.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        items = [str(v).zfill(width) for v in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for it in items for p in expand_shards(head + it + tail)]


def _split_key(name: str):
    """WebDataset's convention: the key is the path up to the first dot of the file name, the rest the field."""
    d, base = os.path.split(name)
    if "." not in base:
        return None, None
    stem, ext = base.split(".", 1)
    return (os.path.join(d, stem) if d else stem), ext.lower()


class WebDatasetReader(_Reader):
    """WebDataset-style tar shards: files grouped by key (key.jpg / key.png ... plus key.txt and/or key.json),
    read as a stream (a key's files are consecutive in the tar, as WebDataset writes them).  The text is key.txt,
    else the "caption" or "text" field of key.json.  Records: {"source" (shard), "key", "image", "text", "meta"
    (key.json's object, or {})}."""

    def __init__(self, shards, skip_bad: bool = False):
        super().__init__(skip_bad)
        self.shards = expand_shards(shards)
        if not self.shards:
            raise ValueError("WebDatasetReader: no shards given")
        for s in self.shards:
            _require_file(s, "WebDatasetReader shard")

    def _scan(self):
        for shard in self.shards:
            yield from self._scan_shard(shard)

    def _scan_shard(self, shard):
        key, files = None, {}
        try:
            with tarfile.open(shard, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    k, ext = _split_key(member.name)
                    if k is None:
                        continue
                    if k != key and key is not None:
                        yield self._group(shard, key, files)
                        files = {}
                    key = k
                    files[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as e:
            yield BadRecord(f"{shard}: unreadable tar after key {key!r} ({type(e).__name__}: {e}); rest of the "
                            "shard skipped")
            return
        if key is not None:
            yield self._group(shard, key, files)

    @staticmethod
    def _group(shard, key, files):
        where = f"{shard}: key {key!r}"
        try:
            # a field "jpg" or "<name>.jpg": decoded by its last extension, as WebDataset's decoders do
            last = {f.rsplit(".", 1)[-1]: f for f in sorted(files, reverse=True)}
            img_ext = next((last[e] for e in IMAGE_EXTS if e in last), None)
            if img_ext is None:
                raise BadRecord(f"{where}: no image file (expected one of .{', .'.join(IMAGE_EXTS)}; "
                                f"has {sorted(files)})")
            meta = {}
            if "json" in last:
                try:
                    meta = json.loads(files[last["json"]].decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise BadRecord(f"{where}: bad JSON in {key}.{last['json']} ({e})") from None
                if not isinstance(meta, dict):
                    raise BadRecord(f"{where}: {key}.{last['json']} must hold an object, got {type(meta).__name__}")
            if "txt" in last:
                try:
                    text = files[last["txt"]].decode("utf-8")
                except UnicodeDecodeError as e:
                    raise BadRecord(f"{where}: {key}.{last['txt']} is not UTF-8 ({e})") from None
            elif isinstance(meta.get("caption"), str) or isinstance(meta.get("text"), str):
                text = meta["caption"] if isinstance(meta.get("caption"), str) else meta["text"]
            else:
                raise BadRecord(f"{where}: no text (expected {key}.txt or a 'caption'/'text' string in {key}.json)")
            image = decode_image(files[img_ext], f"{where} ({key}.{img_ext})")
            return {"source": shard, "key": key, "image": image, "text": text, "meta": meta}
        except BadRecord as e:
            return e


# ----------------------------------------------------------------------------------------------- COCO
def rle_counts_from_string(s) -> list:
    """The COCO API's compressed RLE string -> run lengths.  Each run is written in 5-bit groups, least
    significant first, one character (value + 48) per group, 0x20 marking "more groups follow" and 0x10 in the
    last group the sign; from the third run on the value is the difference to the run two before."""
    if isinstance(s, (bytes, bytearray)):
        s = s.decode("ascii")
    counts, p, n = [], 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError(f"compressed RLE ends inside a run (at character {p})")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"compressed RLE has an invalid character {s[p]!r} at {p}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        if x < 0:
            raise ValueError(f"compressed RLE decodes to a negative run ({x}) at run {len(counts)}")
        counts.append(x)
    return counts


def rle_decode(rle: dict) -> np.ndarray:
    """COCO RLE {"size": [h, w], "counts": [ints] | compressed str} -> (h, w) bool mask.  Runs alternate
    0s and 1s starting with 0s, over the pixels in column-major (Fortran) order."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"RLE must be {{'size': [h, w], 'counts': ...}}, got {rle!r:.80}")
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes, bytearray)):
        counts = rle_counts_from_string(counts)
    elif not isinstance(counts, list) or not all(isinstance(c, int) and c >= 0 for c in counts):
        raise ValueError(f"RLE counts must be a compressed string or a list of non-negative ints, got {counts!r:.80}")
    if sum(counts) != h * w:
        raise ValueError(f"RLE runs cover {sum(counts)} pixels, but size {h}x{w} has {h * w}")
    flat = np.repeat((np.arange(len(counts)) % 2).astype(bool), counts)
    return flat.reshape(w, h).T


def _polygons_mask(polys, h: int, w: int) -> np.ndarray:
    Image, ImageDraw = optional_import("PIL", "Image", "ImageDraw")

    im = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(im)
    for poly in polys:
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or \
                not all(isinstance(v, (int, float)) for v in poly):
            raise ValueError(f"a polygon must be a flat list of at least 3 (x, y) pairs, got {poly!r:.80}")
        draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly), 2)], fill=1)
    return np.asarray(im) > 0


def annotation_mask(segmentation, h: int, w: int) -> np.ndarray:
    """A COCO annotation's segmentation (polygons or RLE) -> (h, w) bool mask."""
    if isinstance(segmentation, list):
        return _polygons_mask(segmentation, h, w)
    if isinstance(segmentation, dict):
        m = rle_decode(segmentation)
        if m.shape != (h, w):
            raise ValueError(f"RLE size {list(m.shape)} does not match the image's {h}x{w}")
        return m
    raise ValueError(f"segmentation must be a list of polygons or an RLE dict, got {type(segmentation).__name__}")


class CocoReader(_Reader):
    """COCO-style instance annotations -> one record per image: {"source", "index", "key" (file_name),
    "image_id", "image" (None when load_images=False), "instances" (int64 (H, W): annotation j of the image gets
    id j + 1, 0 background; where masks overlap the smaller one is on top), "segmentation" (uint8 (3, H, W),
    colour-coded like the synthetic world's, background black), "instance_colors" [{"id", "annotation_id",
    "category", "color"}], "text" (the categories with counts, e.g. "2 person, 1 dog")}.

    Crowd annotations (iscrowd=1) are left out unless include_crowd=True."""

    def __init__(self, annotations, image_dir: str | None = None, skip_bad: bool = False,
                 include_crowd: bool = False, load_images: bool = True):
        super().__init__(skip_bad)
        self.path = _require_file(annotations, "CocoReader")
        self.image_dir = image_dir if image_dir is not None else os.path.dirname(os.path.abspath(self.path))
        self.include_crowd, self.load_images = include_crowd, load_images
        with open(self.path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise BadRecord(f"{self.path}: bad JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
            raise BadRecord(f"{self.path}: expected a COCO object with 'images' and 'annotations' lists")
        self.images = data["images"]
        self.categories = {c.get("id"): c.get("name", str(c.get("id"))) for c in data.get("categories", [])
                           if isinstance(c, dict)}
        self._anns: dict = {}
        self._bad_anns: list = []
        for j, a in enumerate(data["annotations"]):
            if not isinstance(a, dict) or "image_id" not in a or "segmentation" not in a:
                self._bad_anns.append(f"{self.path}: annotation {j} needs 'image_id' and 'segmentation', "
                                      f"got {a!r:.80}")
                continue
            self._anns.setdefault(a["image_id"], []).append(a)

    def __len__(self) -> int:
        return len(self.images)

    def _scan(self):
        for msg in self._bad_anns:
            yield BadRecord(msg)
        for n in range(len(self.images)):
            try:
                yield self[n]
            except BadRecord as e:
                yield e

    def __getitem__(self, n) -> dict:
        """Record n (random access; its image decoded now): BadRecord for an unusable image entry, annotation or
        file.  (Annotations without 'image_id' / 'segmentation' are reported by iteration only.)"""
        from .synthetic import instance_palette

        if isinstance(n, bool) or not isinstance(n, int) or not -len(self) <= n < len(self):
            raise IndexError(f"CocoReader: index {n!r} out of range for {len(self)} images of {self.path!r}")
        n = n % len(self)
        img = self.images[n]
        where = f"{self.path}: image {n}"
        if not isinstance(img, dict) or not all(k in img for k in ("id", "file_name", "height", "width")):
            raise BadRecord(f"{where}: needs 'id', 'file_name', 'height', 'width', got {img!r:.80}")
        where = f"{self.path}: image {n} ({img['file_name']!r}, id {img['id']})"
        h, w = int(img["height"]), int(img["width"])
        image = None
        if self.load_images:
            image = decode_image(_resolve(self.image_dir, img["file_name"]), where)
            if tuple(image.shape[1:]) != (h, w):
                raise BadRecord(f"{where}: the file is {image.shape[2]}x{image.shape[1]} (w x h) but the "
                                f"annotation says {w}x{h}")
        anns = [a for a in self._anns.get(img["id"], []) if self.include_crowd or not a.get("iscrowd", 0)]
        masks = []
        for a in anns:
            try:
                masks.append(annotation_mask(a["segmentation"], h, w))
            except ValueError as e:
                raise BadRecord(f"{where}: annotation {a.get('id')!r}: {e}") from None
        inst = np.zeros((h, w), np.int64)
        for j in sorted(range(len(masks)), key=lambda j: -int(masks[j].sum())):  # small ones on top
            inst[masks[j]] = j + 1
        pal = instance_palette(len(anns))
        names = [self.categories.get(a.get("category_id"), str(a.get("category_id"))) for a in anns]
        table = np.array([[0, 0, 0]] + pal, dtype=np.uint8)
        counts = Counter(names)
        return {"source": self.path, "index": n, "key": img["file_name"], "image_id": img["id"],
                "image": image, "instances": torch.from_numpy(inst),
                "segmentation": torch.from_numpy(np.ascontiguousarray(table[inst].transpose(2, 0, 1))),
                "instance_colors": [{"id": j + 1, "annotation_id": a.get("id"), "category": names[j],
                                     "category_id": a.get("category_id"), "color": pal[j]}
                                    for j, a in enumerate(anns)],
                "text": ", ".join(f"{c} {name}" for name, c in counts.items())}


# ----------------------------------------------------------------------------------------------- VQA
def _field_text(v) -> str:
    """A manifest / TSV cell as text: "" for missing, empty, "nan" or "none" (pandas-written TSVs)."""
    return "" if v is None or str(v).strip().lower() in ("", "nan", "none") else str(v).strip()


def vqa_fields(rec: dict, where: str, multiple_choice: bool | None = None) -> dict:
    """The question fields of one MMBench-style TSV row / JSONL manifest record -> {"question" (the hint, when
    there is one, on the line before it), "options" (2-4 option texts, or [] for a free-form question), "answer"
    (the option letter, or the free-form answer text), "type" (its category, or "all")}.

    Options come from an ``options`` list or from A-D columns; a multiple-choice answer may be given as the letter
    or as the option's text.  multiple_choice: True requires options, False ignores them (the answer is then the
    option's text when given as a letter), None (default) takes what the record has.  BadRecord naming `where` for a
    record without a question or an answer, or an answer that matches no option."""
    if not isinstance(rec, dict):
        raise BadRecord(f"{where}: expected an object, got {type(rec).__name__}")
    q, ans = _field_text(rec.get("question")), _field_text(rec.get("answer"))
    if not q or not ans:
        raise BadRecord(f"{where}: needs a non-empty 'question' and 'answer', got question {q[:40]!r} and answer "
                        f"{ans[:40]!r}")
    opts = rec.get("options")
    if not isinstance(opts, list):
        opts = [_field_text(rec.get(L)) for L in "ABCD" if _field_text(rec.get(L))]
    opts = [str(o) for o in opts]
    if multiple_choice and not 2 <= len(opts) <= 4:
        raise BadRecord(f"{where}: needs a question and 2-4 options (options list or A-D columns), got "
                        f"{len(opts)} option(s)")
    if len(opts) > 4:
        raise BadRecord(f"{where}: at most 4 options (A-D) are supported, got {len(opts)}")
    if opts:
        letters = "ABCD"[:len(opts)]
        if len(ans) == 1 and ans in letters:
            letter = ans
        elif ans in opts:
            letter = letters[opts.index(ans)]
        else:
            raise BadRecord(f"{where}: answer {ans!r} is neither an option letter ({letters}) nor an option's text")
        if multiple_choice is False:
            opts, ans = [], opts[letters.index(letter)]
        else:
            ans = letter
    hint = _field_text(rec.get("hint"))
    return {"question": f"{hint}\n{q}" if hint else q, "options": opts, "answer": ans,
            "type": _field_text(rec.get("category")) or "all"}


class VQAReader(_Reader):
    """A user's VQA data (for CLEAR's generate-then-answer SFT, :func:`umm_ops.data.clear_data.clear_vqa_sample`),
    by the file's extension:

    * ``.json``: LLaVA conversation JSON (:class:`LlavaReader`'s format): the first user turn (its ``<image>``
      placeholder removed) is the question, the first assistant turn the free-form answer; the record's first image;
    * ``.jsonl``: the manifest ``umm mmd-bench build`` and ``umm eval --data`` read: ``image`` (a path, relative to
      image_root, by default the file's folder), ``question``, ``answer``, optional ``options`` (list) or A-D, ``hint``,
      ``category``, ``think`` (the reasoning to train inside ``<think>``; optional);
    * ``.tsv``: an MMBench-style TSV (a header row; ``image`` holding base64-encoded bytes; the same columns).

    Records: {"source", "index", "key", "image" uint8 (3, H, W) at the file's resolution, "question", "options"
    ([] for free-form), "answer" (the option letter, or the text), "type", "think" ("" when absent)}.  Random access:
    ``len(reader)``, ``reader[i]`` decodes record i's image when asked (BadRecord for a record that cannot be used:
    bad fields, a missing or undecodable image, or one declaring more than ``max_pixels`` pixels, refused before
    decoding).  Iterating yields every usable record (``skip_bad``: skip and count the others).  The file is parsed
    once, at construction; images stay encoded (file paths, or the TSV's base64 text) until a record is read, and
    the reader holds only plain data (it pickles, for loader workers)."""

    def __init__(self, path, image_root: str | None = None, skip_bad: bool = False, max_pixels: int | None = None):
        from .mmd_bench import MAX_PIXELS

        super().__init__(skip_bad)
        self.path = _require_file(path, "VQAReader")
        self.image_root = image_root if image_root is not None else os.path.dirname(os.path.abspath(self.path))
        self.max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
        if not isinstance(self.max_pixels, int) or isinstance(self.max_pixels, bool) or self.max_pixels < 1:
            raise ValueError(f"VQAReader: max_pixels must be a positive integer, got {max_pixels!r}")
        ext = os.path.splitext(self.path)[1].lower()
        if ext not in (".json", ".jsonl", ".tsv"):
            raise ValueError(f"VQAReader: {self.path!r}: expected a .json (LLaVA conversations), .jsonl (manifest) "
                             f"or .tsv (MMBench-style) file, got extension {ext or '(none)'!r}")
        self.format = ext[1:]
        self._rows = self._parse()    # [(index, record dict or BadRecord)]

    def _parse(self) -> list:
        if self.format == "tsv":
            import csv
            import sys

            csv.field_size_limit(sys.maxsize)
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="\t")
                if reader.fieldnames is None or "image" not in reader.fieldnames:
                    raise BadRecord(f"{self.path}: an MMBench-style TSV needs a header with an 'image' column "
                                    f"(base64 image bytes), got columns {reader.fieldnames}")
                return [(n, dict(row)) for n, row in enumerate(reader)]
        if self.format == "jsonl":
            rows = []
            with open(self.path, encoding="utf-8") as f:
                for n, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        rows.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        rows.append((n, BadRecord(f"{self.path}: line {n + 1}: bad JSON ({e.msg} at column "
                                                  f"{e.colno})")))
            return rows
        return list(enumerate(_json_list(self.path, "LLaVA records")))

    def __len__(self) -> int:
        return len(self._rows)

    def _where(self, n: int) -> str:
        return f"{self.path}: " + (f"line {n + 1}" if self.format == "jsonl" else f"record {n}")

    def _image(self, src, where: str) -> torch.Tensor:
        from .mmd_bench import _open_rgb

        if self.format == "tsv":
            import base64

            try:
                src = io.BytesIO(base64.b64decode(src or "", validate=True))
            except Exception as e:  # binascii.Error
                raise BadRecord(f"{where}: undecodable base64 image ({e})") from None
            what = "base64 image"
        else:
            if not isinstance(src, str) or not src:
                raise BadRecord(f"{where}: expected an 'image' path, got {src!r:.80}")
            src = _resolve(self.image_root, src)
            why = not_a_file(src)
            if why:
                raise BadRecord(f"{where}: image file {src!r} {why}")
            what = f"image {src!r}"
        im = _open_rgb(src, where, what, self.max_pixels)
        return torch.from_numpy(np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1)))

    def __getitem__(self, i) -> dict:
        if isinstance(i, bool) or not isinstance(i, int) or not -len(self) <= i < len(self):
            raise IndexError(f"VQAReader: index {i!r} out of range for {len(self)} records of {self.path!r}")
        n, rec = self._rows[i]
        if isinstance(rec, BadRecord):
            raise rec
        where = self._where(n)
        if self.format == "json":
            if not isinstance(rec, dict):
                raise BadRecord(f"{where}: expected an object, got {type(rec).__name__}")
            conv = rec.get("conversations")
            turns = conv if isinstance(conv, list) else []
            ask = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "human"), None)
            reply = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
            if not isinstance(ask, str) or not isinstance(reply, str) or not reply.strip():
                raise BadRecord(f"{where}: needs 'conversations' with a human turn and a non-empty gpt turn, got "
                                f"{conv!r:.80}")
            img = rec.get("image")
            img = img[0] if isinstance(img, list) and img else img
            if img is None:
                raise BadRecord(f"{where}: a VQA record needs an image, this one has none")
            q = ask.replace("<image>", "").strip()
            if not q:
                raise BadRecord(f"{where}: the human turn holds no question besides '<image>'")
            fields = {"question": q, "options": [], "answer": reply.strip(), "type": "all"}
            think, key = "", rec.get("id", n)
        else:
            fields = vqa_fields(rec, where)
            img = rec.get("image")
            think, key = _field_text(rec.get("think")), _field_text(rec.get("index")) or str(n)
        image = self._image(img, where)
        return {"source": self.path, "index": n, "key": key, "image": image, **fields, "think": think}

    def _scan(self):
        for i in range(len(self)):
            try:
                yield self[i]
            except BadRecord as e:
                yield e
