"""Command line (`umm` / `python -m umm_ops`):
  info                       what was compiled and what can run here
  mmd-bench build            degrade a benchmark (JSONL or MMBench TSV) at the three levels
  mmd-bench preview          a PNG grid of every MMD-Bench degradation at every level
  train                      train with a recipe on the engine (default sft: the demo job), resumable, torchrun-ready
  export                     a run's consolidated save_pretrained folder
  generate                   an image (PNG) or text from a trained checkpoint
  eval                       held-out evaluation (vqa, caption, geneval, refine, edit, segment, seg-miou, vae-recon,
                             mmd-bench, clear, probe, attention) with 95% CIs
Benchmarks: bench/run.py in the repository."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .utils import MissingDependencyError, optional_import


def _info(args) -> int:
    import umm_ops

    rep = umm_ops.backends()
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    ext = rep["extension"]
    print(f"umm_ops {umm_ops.__version__}  torch {rep['torch']} (cuda {rep['torch_cuda']})  python {rep['python']}")
    print(f"device           : {rep['device']}  ({rep['cpu_threads']} CPU threads)")
    print(f"compiled module  : {'loaded' if ext['loaded'] else 'NOT loaded: ' + str(ext['error'])}"
          + (f" (built against torch {ext['built_against_torch']})" if ext["loaded"] else ""))
    cpu = rep["cpu"]
    print(f"cpu kernels      : " + (f"yes, running {cpu['isa']} (built: {', '.join(cpu['isas_built'])}; "
                                    f"this CPU runs: {', '.join(cpu['isas'])})" if cpu["compiled"] else "no"))
    c = rep["cuda"]
    print(f"cuda kernels     : {'compiled for sm ' + str(c['archs']) if c['compiled'] else 'not compiled'}; "
          f"device {'present' if c['device_available'] else 'absent'} -> {'runnable' if c['runnable'] else 'not runnable'}")
    t = rep["triton"]
    print(f"triton           : {t['version'] if t['installed'] else 'not importable'}"
          f"{' (interpreter)' if t['interpreter'] else ''} -> {'runnable' if t['runnable'] else 'not runnable'}")
    print("reference        : runnable")
    print("kernels          : " + "; ".join(
        f"{op} [{', '.join(b for b in bk if b != 'reference')}]" for op, bk in rep["kernels"].items()
        if not op.endswith(("_backward", "_bwd"))))
    print(f"forced backend   : {rep['forced'] or 'none (auto)'}")
    if rep["forced"] is None:
        print(f"auto choice      : cpu tensors -> {rep['auto']['cpu']}; cuda tensors -> {rep['auto']['cuda'] or 'n/a'}")
    return 0


def _demo_image(size: int):
    """A procedural test picture (gradients, shapes, fine texture) as a (1, 3, size, size) uint8 tensor."""
    import torch

    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([x, y, 1 - x * y]) * 200 + 30
    img += 12 * torch.sin(x * 60) * torch.cos(y * 45)
    s = size
    img[:, s // 5: s // 2, s // 6: s // 2] = torch.tensor([220.0, 40, 40])[:, None, None]
    inside = (x - 0.7) ** 2 + (y - 0.65) ** 2 < 0.04
    img[:, inside] = torch.tensor([30.0, 160, 60])[:, None]
    return img.clamp(0, 255).to(torch.uint8)[None]


def _open_image(path: str):
    """The RGB PIL image of a file; ValueError naming the file when it cannot be read."""
    Image = optional_import("PIL", "Image")

    from .utils import not_a_file

    why = not_a_file(path)
    if why:
        raise ValueError(f"cannot read image {path!r}: it {why}")
    try:
        return Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from None


def _load_image(path: str, size: int):
    """(1, 3, size, size) uint8 (square resize); ValueError naming the file when it cannot be read."""
    import numpy as np
    import torch

    im = _open_image(path).resize((size, size))
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None]


def _is_released_cheers(path) -> bool:
    """A folder of the released Cheers checkpoint (its config.json: model_type "umm" with the UMM sub-configs)."""
    import json

    cfg = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("model_type") == "umm" and "text_config" in d


def _mmd_preview(args) -> int:
    Image, ImageDraw = optional_import("PIL", "Image", "ImageDraw")

    from .data import DEGRADATIONS, LEVELS, degrade
    from .utils import atomic_write

    if args.size < 1:
        print(f"mmd-bench preview: --size must be a positive number of pixels, got {args.size}", file=sys.stderr)
        return 2
    why = _check_out_file("mmd-bench preview", "--out", args.out)
    if why:
        print(why, file=sys.stderr)
        return 2
    try:
        img = _load_image(args.image, args.size) if args.image else _demo_image(args.size)
    except ValueError as e:
        print(f"mmd-bench preview: {e}", file=sys.stderr)
        return 2
    levels = [("clean", 0.0)] + sorted(LEVELS.items(), key=lambda kv: kv[1])
    kinds = sorted(DEGRADATIONS, key=lambda k: (DEGRADATIONS[k][0], k))
    S, pad, label_w = args.size, 4, 150
    grid = Image.new("RGB", (label_w + len(levels) * (S + pad), 20 + len(kinds) * (S + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (name, lv) in enumerate(levels):
        draw.text((label_w + c * (S + pad), 4), f"{name} ({lv})", fill="black")
    for r, kind in enumerate(kinds):
        top = 20 + r * (S + pad)
        draw.text((4, top + S // 2 - 10), f"{kind}\n[{DEGRADATIONS[kind][0]}]", fill="black")
        for c, (_, lv) in enumerate(levels):
            out = img if lv == 0.0 else degrade(img, kind, lv, seed=args.seed)
            tile = Image.fromarray(out[0].permute(1, 2, 0).contiguous().numpy())
            grid.paste(tile, (label_w + c * (S + pad), top))
    atomic_write(args.out, write=grid.save, suffix=".png")
    print(f"wrote {args.out}: {len(kinds)} degradations x {len(levels)} levels ({args.size} px tiles)")
    return 0


def _mmd_build(args) -> int:
    from .data.mmd_bench import BadRecord, build

    levels = tuple(x.strip() for x in args.levels.split(",") if x.strip())
    try:
        rep = build(args.manifest, args.out, seed=args.seed, levels=levels, skip_bad=args.skip_bad,
                    max_pixels=args.max_pixels, backend=args.backend)
    except (BadRecord, FileNotFoundError, ValueError) as e:
        print(f"mmd-bench build: {e}", file=sys.stderr)
        done = getattr(e, "report", None)
        if done is not None:
            print(f"mmd-bench build: stopped; the {done.written} records finished before it are in the manifests "
                  f"under {args.out} (--skip-bad skips and counts bad records instead)", file=sys.stderr)
        return 2
    print(f"wrote {rep.written} records x {len(levels)} levels to {args.out}; skipped {len(rep.skipped)}; "
          f"degradations by the {rep.backend} backend")
    for n, why in rep.skipped[:20]:
        print(f"  skipped record {n}: {why}")
    print("types: " + ", ".join(f"{k} {v}" for k, v in sorted(rep.counts.items())))
    return 0


def _check_device(who: str, device) -> str | None:
    """None when `device` (a --device value, None = default) can run here, else the message to print."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return f"{who}: --device {device!r} is not a device name (expected cpu, cuda or cuda:N)"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"{who}: --device {device} was asked for, but this machine has no usable CUDA device (use --device cpu)"
    return None


def _check_out_file(who: str, flag: str, path, example: str = "out.png") -> str | None:
    """None when `path` can be written as a file, else the message to print."""
    if os.path.isdir(path):
        return f"{who}: {flag} {path} is a folder; expected a file path (e.g. {os.path.join(path, example)})"
    return None


def _interval_arg(text: str) -> tuple:
    """--cfg-interval LO,HI -> (lo, hi) with 0 <= lo < hi <= 1 (argparse reports the error on one line)."""
    import argparse

    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers, e.g. 0.4,1.0), got {text!r}") from None
    if not (0.0 <= lo < hi <= 1.0):
        raise argparse.ArgumentTypeError(f"expected 0 <= LO < HI <= 1, got {text!r}")
    return (lo, hi)


def _add_edit_guidance_args(p, edits: str) -> None:
    """--image-cfg, --cfg-renorm, --cfg-interval: the two-scale guidance of edits (generate and eval)."""
    p.add_argument("--image-cfg", type=float, default=1.0,
                   help=f"{edits}: image guidance scale, applied after --cfg (two-scale CFG as BAGEL / R3, which "
                        "use 1.5; default 1: one scale)")
    p.add_argument("--cfg-renorm", default="none", choices=("none", "global", "channel", "text_channel"),
                   help=f"{edits}: renorm of the guided velocity (R3's edits: text_channel)")
    p.add_argument("--cfg-interval", type=_interval_arg, default=None, metavar="LO,HI",
                   help="guidance only at noise levels 1 - t in (LO, HI] (BAGEL / R3's cfg_interval; R3: 0.4,1.0); "
                        "default everywhere")


def _generate(args) -> int:
    import math

    import torch

    from .eval.world import to_pil as _to_pil
    from .train.export import load_checkpoint_model
    from .utils import atomic_write

    def refuse(msg: str) -> int:
        print(f"generate: {msg}", file=sys.stderr)
        return 2

    # refusals that need no model first
    if args.proxy is not None:
        from .data.proxy import PROXIES, PROXY_PROMPTS

        if args.proxy not in PROXIES:
            return refuse(f"--proxy must be one of {', '.join(PROXIES)}, got {args.proxy!r}")
        if not args.image or args.text or args.refine:
            return refuse("--proxy edits a picture: it needs --image PIC (and neither --text nor --refine)")
        if args.proxy == "referring_seg":
            if not args.prompt or not args.prompt.strip():
                return refuse("--proxy referring_seg needs the object to segment as --prompt, e.g. --prompt "
                              "'Segment the red circle.'")
        elif args.prompt is not None and args.prompt != PROXY_PROMPTS[args.proxy]:
            return refuse(f"--proxy {args.proxy} uses its own instruction {PROXY_PROMPTS[args.proxy]!r}; drop "
                          f"--prompt (got {args.prompt!r})")
        else:
            args.prompt = PROXY_PROMPTS[args.proxy]
    elif args.prompt is None:
        return refuse("--prompt is required (or --proxy NAME with --image PIC)")
    if args.image and not args.text and args.proxy is None:
        return refuse("--image is a picture to ask about and needs --text (image generation takes only --prompt), "
                      "or a picture to edit with --proxy NAME")
    if args.cfg is not None and not math.isfinite(args.cfg):
        return refuse(f"--cfg must be a finite number (1 = no guidance), got {args.cfg}")
    if not math.isfinite(args.image_cfg):
        return refuse(f"--image-cfg must be a finite number (1 = one-scale guidance), got {args.image_cfg}")
    if (args.image_cfg != 1.0 or args.cfg_renorm != "none") and not (args.refine or args.proxy is not None):
        return refuse(f"--image-cfg / --cfg-renorm guide edits: they need --refine or --proxy (got --image-cfg "
                      f"{args.image_cfg}, --cfg-renorm {args.cfg_renorm})")
    if args.size is not None and args.size <= 0:
        return refuse(f"--size must be a positive number of pixels, got {args.size}")
    if args.steps is not None and args.steps < 1:
        return refuse(f"--steps must be >= 1, got {args.steps}")
    if args.max_new_tokens is None:     # 64; each of --restore's two text parts: 96 (byte-spelled markers)
        args.max_new_tokens = 96 if args.restore else 64
    if args.max_new_tokens < 1:
        return refuse(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.bridge and not args.restore:
        return refuse("--bridge is a way for --restore's restoration to join the context: give --restore too")
    if args.restore and not (args.text and args.image):
        return refuse("--restore answers a question about an image (CLEAR's generate-then-answer): it needs --text "
                      "and --image")
    if args.refine < 0 or (args.refine and args.text):
        return refuse(f"--refine must be >= 1 rounds of image refinement (not with --text), got {args.refine}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        return refuse(f"--temperature must be a finite number >= 0, got {args.temperature}")
    why = _check_device("generate", args.device) or (None if args.text and not args.restore else
                                                      _check_out_file("generate", "--out", args.out))
    if why:
        print(why, file=sys.stderr)
        return 2
    try:
        if _is_released_cheers(args.checkpoint):    # the released Cheers folder: its own conventions ("cheers")
            from .model.checkpoint import from_cheers_checkpoint

            model = from_cheers_checkpoint(args.checkpoint, device=args.device)
        else:
            model = load_checkpoint_model(args.checkpoint, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        return refuse(str(e))

    def to_png(img):   # the model's pixel range (profile) -> PIL
        return _to_pil(img, model.profile.pixel_range)
    try:
        if args.text:
            from .data.packing import ImageItem, Sample, TextItem

            prompt = args.prompt
            if args.image:
                size = args.size if args.size is not None else model.config.image_size
                if model.profile.preprocess == "letterbox":   # the released preprocessing, in its pixel range
                    from .model.profile import preprocess

                    pix = preprocess(_open_image(args.image), size, model.profile)
                else:
                    pix = _load_image(args.image, size)[0].float() / 127.5 - 1.0
                prompt = Sample([ImageItem(pix, "understand"), TextItem(args.prompt)])
            if args.restore:
                from .model.clear import generate_then_answer

                r = generate_then_answer(model, [prompt.items[0].image], [args.prompt], steps=args.steps,
                                         cfg_scale=args.cfg, seed=args.seed, temperature=args.temperature,
                                         think_tokens=args.max_new_tokens, answer_tokens=args.max_new_tokens,
                                         bridge=args.bridge)[0]
                print(r["text"])
                if r.get("latent") is not None:     # the bridge answered from the latent: pixels for --out only
                    with torch.no_grad():
                        r["image"] = model.vae.decode(r["latent"][None].to(model.device, model.dtype),
                                                      prompt.items[0].image.shape[-2:],
                                                      clamp=tuple(model.profile.pixel_range))[0].float()
                if r["image"] is not None:
                    atomic_write(args.out, write=to_png(r["image"]).save, suffix=".png")
                    print(f"restored image -> {args.out}")
                else:
                    print("the model answered without restoring the image")
                print(f"answer: {r['answer']!r}")
                return 0
            text = model.generate_text([prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       seed=args.seed)[0]
            print(text)
            return 0
        size = args.size if args.size is not None else model.config.image_size
        p = model.config.pixels_per_token
        if size % p:
            return refuse(f"--size must be a multiple of {p} (pixels per LLM token), got {size}")
        if args.proxy is not None:
            # SGT's proxy task through the model's edit path: [picture (understand)] [instruction] -> an image
            from .eval.tasks import pixels

            pix = pixels(_load_image(args.image, size)[0], model.profile.pixel_range)   # the model's range
            with torch.no_grad():
                img = model.edit_image([pix], [args.prompt], height=size, width=size, steps=args.steps,
                                       cfg_scale=args.cfg, image_cfg_scale=args.image_cfg,
                                       cfg_renorm=args.cfg_renorm, cfg_interval=args.cfg_interval,
                                       seed=args.seed)["images"][0]
        elif args.refine:
            from pathlib import Path

            from .model.refine import generate_refined

            res = generate_refined(model, [args.prompt], max_rounds=args.refine, steps=args.steps,
                                   cfg_scale=args.cfg, seed=args.seed, temperature=args.temperature,
                                   think_tokens=args.max_new_tokens, reflect_tokens=args.max_new_tokens,
                                   height=size, width=size, image_cfg_scale=args.image_cfg,
                                   cfg_renorm=args.cfg_renorm, cfg_interval=args.cfg_interval)[0]
            stem = Path(args.out)
            for rd in res["rounds"]:
                path = stem.with_name(f"{stem.stem}-round{rd['round']}{stem.suffix or '.png'}")
                atomic_write(path, write=to_png(rd["image"]).save, suffix=".png")
                what = rd["text"] if rd["round"] == 1 else f"instruction: {rd['instruction']!r}"
                print(f"round {rd['round']}: {what!r:.200} -> {path}")
            print("the model said no further edit is needed" if res["stopped"] else
                  f"stopped after --refine {args.refine} rounds")
            img = res["image"]
        else:
            with torch.no_grad():
                img = model.generate_image([args.prompt], height=size, width=size, steps=args.steps,
                                           cfg_scale=args.cfg, cfg_interval=args.cfg_interval,
                                           seed=args.seed)["images"][0]
    except (ValueError, FloatingPointError) as e:  # refused settings, a prompt too long, a NaN image: no file
        return refuse(str(e))
    out = args.out
    atomic_write(out, write=to_png(img).save, suffix=".png")
    print(f"wrote {out} ({size}x{size}, {args.steps or model.config.sample_steps} steps): {args.prompt!r}")
    return 0


def _run_world(path):
    """(first, image_size, world_kwargs) from the saved config of a run / checkpoint folder; None for a
    save_pretrained folder (it keeps no run config)."""
    import inspect
    from pathlib import Path

    from .data.synthetic import SyntheticWorld
    from .train.engine.checkpoint import read_trainer_state
    from .train.export import resolve_checkpoint

    if (Path(path) / "config.json").is_file():
        return None
    st = read_trainer_state(resolve_checkpoint(path))
    cfg = st["config"]
    recipe = cfg.get("recipe") or {}
    params = set(inspect.signature(SyntheticWorld).parameters) - {"size", "seed", "length"}
    # the world the run's recipe read from recipe.init (flow-grpo and its family), recorded in the checkpoint; else
    # the recipe's own world keys
    saved = st.get("world", recipe)
    world = {k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k in params}
    if "world" not in st and cfg.get("recipe_name") == "flow-grpo":
        # RL runs draw their prompts from the world of the run they started from (recipe.init)
        from .train.config import Config
        from .train.spec import get_recipe

        world = get_recipe("flow-grpo").world_kwargs(Config.from_dict(cfg, where=str(path)))
    if world and "object_scale" not in world:
        world["object_scale"] = 1.0   # a run saved before the argument existed trained on SyntheticWorld's default
    world["seed"] = int(cfg.get("job", {}).get("seed", 0))
    return recipe.get("train_records"), recipe.get("image_size"), world


def _eval(args) -> int:
    import torch

    from .eval.runner import evaluate, render_markdown, write_json
    from .utils import seed_of

    if (args.checkpoint is None) == (args.model is None):
        print("eval: give a run / checkpoint folder or --model PRESET (one of them)", file=sys.stderr)
        return 2
    why = _check_device("eval", args.device) or (args.json and _check_out_file("eval", "--json", args.json, "eval.json"))
    if not why and args.out and os.path.isfile(args.out):
        why = f"eval: --out {args.out} is a file; expected a folder for eval.json, eval.md and the sample grids"
    if why:
        print(why, file=sys.stderr)
        return 2
    first, size, world = None, None, {}
    if args.model is not None:
        from .eval.runner import default_first, default_world_kwargs
        from .model.cheers import CheersModel

        torch.manual_seed(seed_of(0, "eval", "model-init"))   # the same untrained weights whatever --seed
        try:
            model = CheersModel(args.model)
        except ValueError as e:
            print(f"eval: {e}", file=sys.stderr)
            return 2
        model.eval()
        if not model.vae.calibrated:
            # a fresh VAE has no latent statistics: take them from training records, as the SFT recipe does
            from .data.synthetic import SyntheticWorld

            k = min(64, default_first())
            w = SyntheticWorld(size=args.image_size or model.config.image_size, length=k, **default_world_kwargs())
            model.vae.calibrate(torch.stack([w[i].image.float() / 127.5 - 1.0 for i in range(k)]))
        if args.device:
            model.to(args.device)
        name = f"preset {args.model} (untrained)"
    else:
        from .train.export import load_checkpoint_model

        try:
            if _is_released_cheers(args.checkpoint):    # the released Cheers folder: its own conventions ("cheers")
                from .model.checkpoint import from_cheers_checkpoint

                model, saved = from_cheers_checkpoint(args.checkpoint, device=args.device), None
            else:
                model = load_checkpoint_model(args.checkpoint, device=args.device)
                saved = _run_world(args.checkpoint)
        except (FileNotFoundError, ValueError) as e:
            print(f"eval: {e}", file=sys.stderr)
            return 2
        if saved is not None:
            first, size, world = saved
        name = str(args.checkpoint)
    if args.first is not None:
        if first is not None and args.first < first:
            print(f"eval: --first {args.first} is inside the run's training split (records 0..{first - 1}); "
                  f"held-out records start at {first}", file=sys.stderr)
            return 2
        first = args.first

    def progress(task, res, seconds):
        sc = "-" if res["score"] is None else f"{res['score']:.3f}"
        print(f"eval {task}: {sc} on {res['n']} items ({seconds:.1f} s)", flush=True)

    try:
        res = evaluate(model, args.tasks, n=args.n, seed=args.seed, image_size=args.image_size or size,
                       out_dir=args.out, world_kwargs=world, first=first, steps=args.steps,
                       batch_size=args.batch_size, model_name=name, data=args.data, progress=progress,
                       refine_rounds=args.rounds, cfg_scale=args.cfg, image_cfg_scale=args.image_cfg,
                       cfg_renorm=args.cfg_renorm, cfg_interval=args.cfg_interval)
    except (FileNotFoundError, ValueError) as e:
        print(f"eval: {e}", file=sys.stderr)
        return 2
    print()
    print(render_markdown(res, breakdowns=not args.brief), end="")
    if args.json:
        write_json(res, args.json)
        print(f"wrote {args.json}")
    if args.out:
        print(f"wrote {args.out}/eval.json, eval.md and a sample grid per task")
    return 0


def _build_tokenizer(args) -> int:
    from .data.world_tokenizer import SHIPPED_TOKENIZER, WORLD_VOCAB_SIZE, build_world_tokenizer

    out = args.out or SHIPPED_TOKENIZER
    try:
        if args.out is not None and os.path.isfile(args.out):
            raise ValueError(f"--out {args.out} is a file; expected a folder for the tokenizer files")
        cmd = "umm build-tokenizer" + (f" --out {args.out}" if args.out else "") + \
            (f" --vocab-size {args.vocab_size}" if args.vocab_size else "") + \
            (f" --records {args.records}" if args.records != 2000 else "")
        vocab = WORLD_VOCAB_SIZE if args.vocab_size is None else args.vocab_size  # 0 is refused, not the default
        info = build_world_tokenizer(out, vocab, args.records, command=cmd)
    except ValueError as e:
        print(f"build-tokenizer: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {info['vocab_size']} tokens; the corpus ({info['corpus_texts']} texts, "
          f"{info['corpus_chars']} characters) encodes to {info['corpus_tokens']} tokens")
    return 0


def main(argv=None) -> int:
    from .data.mmd_bench import MAX_PIXELS

    ap = argparse.ArgumentParser(prog="umm_ops", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="what was compiled and what can run here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_info)
    mb = sub.add_parser("mmd-bench", help="MMD-Bench degradations (CLEAR)")
    mbs = mb.add_subparsers(dest="mmd_cmd", required=True)
    bd = mbs.add_parser("build", help="degrade a benchmark: one weighted-random type per image, three levels")
    bd.add_argument("--manifest", required=True, help="JSONL (image path + fields per line) or MMBench-style TSV")
    bd.add_argument("--out", required=True, help="output folder: <out>/<level>/manifest.jsonl and images/")
    bd.add_argument("--seed", type=int, default=0)
    bd.add_argument("--levels", default="low,mid,high")
    bd.add_argument("--skip-bad", action="store_true", help="skip and count unusable records instead of stopping")
    bd.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                    help=f"images declaring more pixels (width x height) are bad records (default {MAX_PIXELS:,})")
    bd.add_argument("--backend", choices=("auto", "opencv", "torch"), default="auto",
                    help="opencv: CLEAR's own OpenCV operations (exact); torch: the batched approximation; "
                         "auto (default): opencv when OpenCV is installed")
    bd.set_defaults(fn=_mmd_build)
    pv = mbs.add_parser("preview", help="PNG grid of every degradation type at every level")
    pv.add_argument("--out", default="mmd_bench_preview.png")
    pv.add_argument("--image", default=None, help="an image file (default: a procedural test picture)")
    pv.add_argument("--size", type=int, default=256, help="tile size in pixels")
    pv.add_argument("--seed", type=int, default=0)
    pv.set_defaults(fn=_mmd_preview)

    bt = sub.add_parser("build-tokenizer", help="train the synthetic world's BPE tokenizer (the tiny preset's)")
    bt.add_argument("--out", default=None, help="output folder (default: the one shipped in the package, "
                                                "umm_ops/assets/world-tokenizer)")
    bt.add_argument("--vocab-size", type=int, default=None, help="default 512")
    bt.add_argument("--records", type=int, default=2000, help="world scenes whose text is the corpus")
    bt.set_defaults(fn=_build_tokenizer)

    from .train.cli import add_parsers

    add_parsers(sub, argv)
    ge = sub.add_parser("generate", help="an image (PNG) or text from a checkpoint")
    ge.add_argument("checkpoint", help="a run folder (its newest checkpoint), a checkpoint-<step> folder or a "
                                       "save_pretrained folder")
    ge.add_argument("--prompt", default=None, help="the text prompt (required unless --proxy; with --proxy "
                                                   "referring_seg: the instruction, e.g. 'Segment the red circle.')")
    ge.add_argument("--out", default="generated.png", help="PNG path (image mode)")
    ge.add_argument("--text", action="store_true", help="generate text instead of an image")
    ge.add_argument("--image", default=None, help="with --text: an image file to ask about; with --proxy: the "
                                                  "picture to turn into the proxy's map")
    ge.add_argument("--proxy", default=None, metavar="NAME",
                    help="SGT: edit --image with a proxy task's instruction (instance_seg: the colour-coded instance "
                         "map; semantic_seg, edge, reconstruction, denoising, deblurring, super_resolution, "
                         "inpainting). The picture is used as given: for the restoration tasks give a degraded one")
    ge.add_argument("--size", type=int, default=None, help="image side (default: the model's image_size)")
    ge.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    ge.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    _add_edit_guidance_args(ge, "edits (--refine, --proxy)")
    ge.add_argument("--max-new-tokens", type=int, default=None,
                    help="text token budget (default 64; with --restore 96 for each of its two text parts)")
    ge.add_argument("--temperature", type=float, default=0.0)
    ge.add_argument("--seed", type=int, default=0)
    ge.add_argument("--restore", action="store_true",
                    help="with --text and --image: CLEAR's generate-then-answer (the model may restore the image "
                         "first; the restoration is written to --out)")
    ge.add_argument("--bridge", action="store_true",
                    help="with --restore: CLEAR's latent bridge (the restored latent is written into the KV cache "
                         "without decoding to pixels and re-encoding; it is decoded for --out after the answer)")
    ge.add_argument("--refine", type=int, default=0, metavar="N",
                    help="R3's loop: up to N rounds of plan / draw, then reflect / edit until the model says no "
                         "further edit is needed (each round's image is also written as OUT-round<k>.png)")
    ge.add_argument("--device", default=None)
    ge.set_defaults(fn=_generate)
    ev = sub.add_parser("eval", help="held-out evaluation with 95%% confidence intervals (markdown table, JSON)")
    ev.add_argument("checkpoint", nargs="?", default=None,
                    help="a run folder (its newest checkpoint), a checkpoint-<step> folder or a save_pretrained folder")
    ev.add_argument("--model", default=None, help="evaluate an untrained preset instead (tiny, small, ...)")
    ev.add_argument("--tasks", default="vqa,caption,geneval,segment,vae-recon,mmd-bench",
                    help="comma-separated: vqa, vqa-short, vqa-chain, caption, geneval, refine, edit, segment, "
                         "seg-miou, vae-recon, mmd-bench, mmd-bench-short, clear, clear-short, clear-bridge, "
                         "clear-short-bridge, probe, attention")
    ev.add_argument("--n", type=int, default=256, help="held-out records per task")
    ev.add_argument("--seed", type=int, default=0, help="evaluation seed (question picks, sampler noise, bootstrap)")
    ev.add_argument("--json", default=None, help="write the result as JSON here")
    ev.add_argument("--out", default=None, help="folder for eval.json, eval.md and the sample grids (PNG)")
    ev.add_argument("--first", type=int, default=None,
                    help="first held-out record (default: the run's recipe.train_records, else 50000)")
    ev.add_argument("--data", default=None, help="a multiple-choice benchmark (MMBench-style TSV or JSONL manifest) "
                                                 "for vqa / mmd-bench instead of the synthetic world")
    ev.add_argument("--image-size", type=int, default=None, help="default: the run's image size")
    ev.add_argument("--steps", type=int, default=None, help="sampler steps of generated images (default: the model's)")
    ev.add_argument("--rounds", type=int, default=3, help="rounds of R3's loop (task refine)")
    ev.add_argument("--cfg", type=float, default=None,
                    help="guidance scale of generated images (tasks geneval, edit, refine; default: the model's)")
    _add_edit_guidance_args(ev, "edits (tasks edit, refine)")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--brief", action="store_true", help="print only the summary table")
    ev.add_argument("--device", default=None)
    ev.set_defaults(fn=_eval)

    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except MissingDependencyError as e:   # an extra of umm_ops that is not installed: its message says which
        print(f"umm {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
