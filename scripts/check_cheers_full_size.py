"""One-off check of the released Cheers geometry at full size (not a CI test: ~2.6B parameters, minutes of CPU).

No released weights can be downloaded here, so this builds the RELEASED model class (AI9Stars/Cheers da1cb77,
Training/cheers_config/*.py, loaded as scripts/record_cheers_fixtures.py loads it, transformers 4.51.3) at the
released config.json (Qwen2.5-1.5B LLM, SigLIP-2 so400m-shaped ViT at 512 px, the FLUX.2-shaped VAE) with its own
random initialisation in bfloat16, and:

  1. checks its state-dict names against the released checkpoint's model.safetensors.index.json (the real index,
     shipped in Training/cheers_config): the same 1321 names;
  2. writes it in the released layout (safetensors shards + model.safetensors.index.json + config.json +
     preprocessor_config.json + the released Qwen2.5 tokenizer files) to FOLDER;
  3. runs the released code in bfloat16: an understanding prompt (a letterboxed random image + question:
     first-token logits over the whole vocabulary, greedy continuation) and text-to-image with CFG for 2 sampler
     steps from given initial noise (each step's conditional / unconditional velocity, the final latent and pixels);
     and, for the tolerance, the same understanding logits with the eager attention instead of sdpa (the released
     code's own bf16 kernel-order spread at full size);
  4. frees it, loads FOLDER with our ``from_cheers_checkpoint(FOLDER, dtype=torch.bfloat16)`` (built on the meta
     device: one copy of the weights in memory) - every released tensor must be used except the ones our converter
     drops by design (the tied lm_head copy, the SigLIP pooling head the model never calls) - checks every shape,
     and runs the same inputs through our public API;
  5. writes the figures to docs/results/cheers_full_size.json;
  6. (``spread`` phase, run after ``all``) rebuilds the released model from FOLDER and computes the first
     conditional velocity with sdpa (must reproduce the recorded one: the folder holds the weights the outputs came
     from) and with the eager attention: the released code's own bf16 spread on that output at full size.

Each phase runs in its own process (peak memory: one model, ~5.2 GB, plus a shard being written; measured 6.2 GB).

    CHEERS_SRC=/tmp/cheers/Training/cheers_config CHEERS_DEPS=/tmp/rec_pkgs OMP_NUM_THREADS=1 \\
        .venv/bin/python scripts/check_cheers_full_size.py [all|released|ours] [FOLDER (default /tmp/cheers_full_size)]

``check_cheers_full_size.py shapes`` writes instead tests/fixtures/cheers_released_full_shapes.json (the released
class's tensor names and shapes at the released config, built on the meta device; checked against the real index)
for tests/test_cheers_full_geometry.py.
"""
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 4321
T2I = dict(prompt="A red cube on a blue floor.", steps=2, cfg_scale=3.0, alpha=0.5)
QUESTION = "Describe this image."
N_GEN = 3
SHARD_BYTES = 1 << 30
OUT_JSON = os.path.join(ROOT, "docs", "results", "cheers_full_size.json")


def _rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _log(*a):
    print(f"[{time.strftime('%H:%M:%S')} peak {_rss_gb():.1f} GB]", *a, flush=True)


def _image():
    rng = np.random.RandomState(SEED + 1)
    return rng.randint(0, 256, (300, 420, 3), dtype=np.uint8)         # 420 x 300: letterboxed to 512 x 512


def phase_released(src, deps, folder, io_path):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from record_cheers_fixtures import load_released
    from PIL import Image
    from safetensors.torch import save_file

    mods, pkg = load_released(src, deps)
    torch.set_num_threads(1)
    with open(os.path.join(src, "config.json")) as f:
        released_cfg = json.load(f)
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        released_index = json.load(f)
    cfg = mods["configuration_umm"].UMMConfig(**{k: v for k, v in released_cfg.items() if k not in ("auto_map",)})
    t0 = time.time()
    torch.manual_seed(SEED)
    model = mods["modeling_umm"].Cheers._from_config(cfg, attn_implementation="sdpa", torch_dtype=torch.bfloat16)
    # as Inference/T2I.py, I2T.py, T2T.py: model.to(torch.bfloat16) - on a bf16 model it only rounds the float32
    # RoPE inv_freq buffers (transformers computes them in float32), which the released scripts run with
    model.to(torch.bfloat16)
    assert all(b.dtype == torch.bfloat16 for n, b in model.named_buffers() if n.endswith("inv_freq"))
    model.eval()
    _log(f"released model built in {time.time() - t0:.0f} s")
    sd = model.state_dict()
    names = set(sd)
    index_names = set(released_index["weight_map"])
    rec = dict(n_params=sum(p.numel() for p in model.parameters()),
               state_names=len(names), index_names=len(index_names),
               not_in_index=sorted(names - index_names), index_not_built=sorted(index_names - names),
               dtypes=sorted({str(v.dtype) for v in sd.values()}))
    _log("names", {k: v for k, v in rec.items() if not isinstance(v, list)}, rec["not_in_index"][:5],
         rec["index_not_built"][:5])

    # ------------------------------------------------------------------ the released layout
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    shards, cur, size = [], {}, 0
    for k in sorted(sd):
        nbytes = sd[k].numel() * sd[k].element_size()
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = sd[k]
        size += nbytes
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # the tied lm_head shares the embedding's storage: safetensors stores it as its own tensor (as released)
        save_file({k: v.detach().clone().contiguous() if k == "lm_head.weight" else v.detach().contiguous()
                   for k, v in shard.items()}, os.path.join(folder, fname), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
        gc.collect()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    for n in ("config.json", "preprocessor_config.json", "generation_config.json", "vocab.json", "merges.txt",
              "tokenizer_config.json"):
        shutil.copy(os.path.join(src, n), os.path.join(folder, n))
    rec.update(shards=len(shards), total_size=total, released_total_size=released_index["metadata"]["total_size"])
    _log(f"wrote {folder}: {len(shards)} shards, {total / 1e9:.2f} GB")
    del sd, shards, cur

    # ------------------------------------------------------------------ the released code's outputs (bf16)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    with open(os.path.join(src, "preprocessor_config.json")) as f:
        res = json.load(f)["scale_resolution"]
    improc = mods["image_processing_umm"].UMMImageProcessor(scale_resolution=res, patch_size=16)
    proc = mods["processing_umm"].UMMProcessor(image_processor=improc, tokenizer=tok)
    added = tok.convert_tokens_to_ids(["<image>", "<image_gen>", "<im_start>", "<im_end>", "<no_mean>"])
    assert added == [151665, 151666, 151667, 151668, 151669], added

    def chat(content):
        return proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                        add_generation_prompt=True)

    io = {}
    content = "<im_start><image><im_end>\n " + QUESTION
    inputs = proc(text=[chat(content)], images=[Image.fromarray(_image())], return_tensors="pt",
                  add_im_start_id=False)
    t0 = time.time()
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items()})
    io["i2t.logits"] = out.logits[0, -1].float().clone()
    _log(f"understanding forward {time.time() - t0:.0f} s, {inputs['input_ids'].shape[1]} ids")
    t0 = time.time()
    with torch.no_grad():
        g = model.generate(**dict(inputs), max_length=N_GEN - 1, temperature=0.0)
    io["i2t.generated"] = g["input_ids"][0].clone()
    io["i2t.input_ids"] = inputs["input_ids"][0].clone()
    io["i2t.pixels"] = inputs["pixel_values"][0].float().clone()
    _log(f"greedy {io['i2t.generated'].tolist()} in {time.time() - t0:.0f} s")

    np.random.seed(SEED)         # the processor's dummy image
    t2i_in = proc(text=[chat(T2I["prompt"])], images=[None], return_tensors="pt", add_im_start_id=True)
    h, w = (int(v) for v in t2i_in["grid_hws"][0])
    z0 = torch.randn((1, 128, h, w), generator=torch.Generator().manual_seed(SEED + 5)).bfloat16()
    calls, latents = [], []
    real_randn, drift_fn, decode = torch.randn, model._drift_fn, model.model.vae_model.decode

    def fixed_randn(*a, **k):
        assert tuple(a[0]) == tuple(z0.shape) and k.get("dtype") == torch.bfloat16, (a, k)
        return z0.clone()

    def rec_drift(x_t, t, *a, **k):
        r = drift_fn(x_t, t, *a, **k)
        calls.append(dict(x_t=x_t.float().clone(), t=float(t), v=r[0].float().clone()))
        return r

    def rec_decode(z):
        latents.append(z.float().clone())
        return decode(z)

    model._drift_fn, model.model.vae_model.decode = rec_drift, rec_decode
    torch.randn = fixed_randn
    t0 = time.time()
    try:
        with torch.no_grad():
            g = model.generate(**dict(t2i_in), max_length=0, cfg_scale=T2I["cfg_scale"], temperature=0.0,
                               num_inference_steps=T2I["steps"], alpha=T2I["alpha"], edit_image=False)
    finally:
        torch.randn = real_randn
        model._drift_fn, model.model.vae_model.decode = drift_fn, decode
    _log(f"text-to-image ({T2I['steps']} steps, CFG) {time.time() - t0:.0f} s")
    assert len(calls) == 2 * T2I["steps"] and len(latents) == 1
    cond, unc = calls[0::2], calls[1::2]
    io.update({"t2i.input_ids": t2i_in["input_ids"][0].clone(),
               "t2i.dummy": (t2i_in["pixel_values"][0] * 255).round().to(torch.uint8),
               "t2i.init_noise": z0[0].float(), "t2i.t": torch.tensor([c["t"] for c in cond], dtype=torch.float64),
               "t2i.x_t": torch.stack([c["x_t"][0] for c in cond]),
               "t2i.v_cond": torch.stack([c["v"][0] for c in cond]),
               "t2i.v_uncond": torch.stack([c["v"][0] for c in unc]),
               "t2i.latent": latents[0][0], "t2i.pixels": g["images"][0][0].float().clamp(0.0, 1.0)})

    # the tolerance: the released code's own bf16 spread at this size - eager attention instead of sdpa
    try:
        for m in model.modules():
            if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
                m.config._attn_implementation = "eager"
        t0 = time.time()
        with torch.no_grad():
            out = model(**{k: v for k, v in inputs.items()})
        io["i2t.logits_eager"] = out.logits[0, -1].float().clone()
        _log(f"understanding forward (eager attention) {time.time() - t0:.0f} s")
    except Exception as e:          # the figure is then missing from the JSON, the rest stands
        _log(f"eager attention run failed: {e!r}")
    torch.save(dict(rec=rec, io=io, resolution=res), io_path)
    shutil.rmtree(pkg, ignore_errors=True)


def phase_spread(src, deps, folder, io_path):
    """The released code's own bf16 spread at full size on the first conditional velocity: the same weights (read
    back from FOLDER) and inputs with the eager attention instead of sdpa (t = 0, x = the initial noise)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from record_cheers_fixtures import load_released
    from safetensors.torch import load_file

    mods, pkg = load_released(src, deps)
    from transformers import AutoTokenizer       # the released code's transformers (4.51), after load_released

    torch.set_num_threads(1)
    saved = torch.load(io_path)
    io = saved["io"]
    with open(os.path.join(src, "config.json")) as f:
        released_cfg = json.load(f)
    cfg = mods["configuration_umm"].UMMConfig(**{k: v for k, v in released_cfg.items() if k != "auto_map"})
    model = mods["modeling_umm"].Cheers._from_config(cfg, attn_implementation="sdpa", torch_dtype=torch.bfloat16)
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    n = 0
    with torch.no_grad():
        own = model.state_dict()
        for fname in files:
            for k, v in load_file(os.path.join(folder, fname)).items():
                own[k].copy_(v)
                n += 1
    assert n == len(own), (n, len(own))
    model.to(torch.bfloat16)
    model.eval()
    _log(f"released model rebuilt from {folder}")
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    improc = mods["image_processing_umm"].UMMImageProcessor(scale_resolution=saved["resolution"], patch_size=16)
    proc = mods["processing_umm"].UMMProcessor(image_processor=improc, tokenizer=tok)
    np.random.seed(SEED)
    text = proc.apply_chat_template([{"role": "user", "content": T2I["prompt"]}], tokenize=False,
                                    add_generation_prompt=True)
    inp = proc(text=[text], images=[None], return_tensors="pt", add_im_start_id=True)
    assert inp["input_ids"][0].tolist() == io["t2i.input_ids"].tolist()
    out = {}
    for impl in ("sdpa", "eager"):
        for m in model.modules():
            if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
                m.config._attn_implementation = impl
        t0 = time.time()
        got = []
        drift_fn, real_randn = model._drift_fn, torch.randn

        class _Stop(Exception):
            pass

        def first(x_t, t, *a, **k):       # the released generate up to its first velocity (cfg 1: no second branch)
            got.append(drift_fn(x_t, t, *a, **k)[0].float())
            raise _Stop

        model._drift_fn = first
        torch.randn = lambda *a, **k: io["t2i.init_noise"][None].bfloat16().clone()
        try:
            with torch.no_grad():
                model.generate(**dict(inp), max_length=0, cfg_scale=1.0, temperature=0.0,
                               num_inference_steps=T2I["steps"], alpha=T2I["alpha"], edit_image=False)
        except _Stop:
            pass
        finally:
            model._drift_fn, torch.randn = drift_fn, real_randn
        out[impl] = got[0][0]
        _log(f"{impl}: first conditional velocity in {time.time() - t0:.0f} s, vs the recorded one "
             f"{_rel(out[impl], io['t2i.v_cond'][0]):.3g}")
    spread = dict(v_cond0_eager_vs_sdpa=_rel(out["eager"], out["sdpa"]),
                  v_cond0_sdpa_vs_recorded=_rel(out["sdpa"], io["t2i.v_cond"][0]))
    _log("spread", spread)
    with open(OUT_JSON) as f:
        res = json.load(f)
    res["figures"].update({f"released_spread.{k}": v for k, v in spread.items()})
    with open(OUT_JSON, "w") as f:
        json.dump(res, f, indent=1)
    shutil.rmtree(pkg, ignore_errors=True)


SHAPES_FIXTURE = os.path.join(ROOT, "tests", "fixtures", "cheers_released_full_shapes.json")


def phase_shapes(src, deps):
    """tests/fixtures/cheers_released_full_shapes.json: every tensor name and shape of the released class at the
    released config.json (built on the meta device: no memory), checked against the released index's names, with
    the config - what tests/test_cheers_full_geometry.py maps through our converter without the released code."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from record_cheers_fixtures import SOURCE, load_released

    mods, pkg = load_released(src, deps)
    with open(os.path.join(src, "config.json")) as f:
        released_cfg = json.load(f)
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        index_names = set(json.load(f)["weight_map"])
    with open(os.path.join(src, "preprocessor_config.json")) as f:
        res = json.load(f)["scale_resolution"]
    cfg = mods["configuration_umm"].UMMConfig(**{k: v for k, v in released_cfg.items() if k != "auto_map"})
    with torch.device("meta"):
        model = mods["modeling_umm"].Cheers._from_config(cfg, attn_implementation="sdpa", torch_dtype=torch.bfloat16)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(shapes) == index_names, (sorted(set(shapes) - index_names)[:5], sorted(index_names - set(shapes))[:5])
    with open(SHAPES_FIXTURE, "w") as f:
        json.dump(dict(source=SOURCE, config=released_cfg, scale_resolution=res, shapes=shapes,
                       note="names = the released checkpoint's model.safetensors.index.json weight_map keys"), f)
    shutil.rmtree(pkg, ignore_errors=True)
    print(f"wrote {SHAPES_FIXTURE} ({os.path.getsize(SHAPES_FIXTURE)} bytes, {len(shapes)} tensors)")


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _latent(z):
    return z.flatten(-2).transpose(-1, -2)


def phase_ours(folder, io_path):
    from safetensors import safe_open

    from umm_ops.data.packing import ImageItem, Sample, TextItem
    from umm_ops.model import generate as G
    from umm_ops.model.checkpoint import from_cheers_checkpoint
    from umm_ops.model.profile import letterbox

    torch.set_num_threads(1)
    saved = torch.load(io_path)
    rec, io = saved["rec"], saved["io"]
    t0 = time.time()
    model = from_cheers_checkpoint(folder, dtype=torch.bfloat16)
    _log(f"ours loaded in {time.time() - t0:.0f} s")
    # every released tensor: used, or dropped by design; every shape as the checkpoint's
    from umm_ops.model.checkpoint import convert_cheers_state_dict

    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        wm = json.load(f)["weight_map"]
    shapes = {}
    for fname in sorted(set(wm.values())):
        with safe_open(os.path.join(folder, fname), framework="pt") as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
    meta_state = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in shapes.items()}
    conv = convert_cheers_state_dict(meta_state, len(model.config.vae.block_out_channels), True)
    own = model.state_dict()
    dropped = sorted(k for k in shapes if k == "lm_head.weight" or k.startswith("model.vision_representation.head."))
    ours_rec = dict(
        n_params=sum(p.numel() for p in model.parameters()),
        model_tensors=len(own), converted=len(conv), released_tensors=len(shapes), dropped_by_design=dropped,
        missing=sorted(set(own) - set(conv) - {"llm.lm_head.weight"}), unexpected=sorted(set(conv) - set(own)),
        shape_mismatch=sorted(k for k in conv if k in own and tuple(conv[k].shape) != tuple(own[k].shape)),
        dtypes=sorted({str(v.dtype) for v in own.values()}),
        lm_head_tied=model.llm.lm_head.weight.data_ptr() == model.llm.model.embed_tokens.weight.data_ptr(),
        image_size=model.config.image_size)
    _log("ours", {k: v for k, v in ours_rec.items() if k != "dropped_by_design"}, len(dropped), "dropped")
    res = saved["resolution"]
    figs = {}
    img = letterbox(_image(), res)
    figs["i2t.pixels_equal"] = bool(torch.equal(img, io["i2t.pixels"]))
    prompt = Sample([ImageItem(img), TextItem("\n " + QUESTION)])      # the released content after <im_end>
    ids = G.prompt_ids(model, prompt)
    pad = model.tokenizer.special("<image>")
    collapsed = [t for i, t in enumerate(ids.tolist()) if t != pad or i == 0 or ids[i - 1] != pad]
    collapsed = [-200 if t == pad else t for t in collapsed]
    figs["i2t.ids_equal"] = collapsed == io["i2t.input_ids"].tolist()
    t0 = time.time()
    lg = G.next_token_logits(model, prompt)[0].float()
    _log(f"ours understanding forward {time.time() - t0:.0f} s")
    ref = io["i2t.logits"]
    figs["i2t.logits_rel"] = _rel(lg, ref)
    if "i2t.logits_eager" in io:
        figs["i2t.logits_rel_released_eager_vs_sdpa"] = _rel(io["i2t.logits_eager"], ref)
    figs["i2t.top1"] = [int(lg.argmax()), int(ref.argmax())]
    top = ref.topk(10).indices
    figs["i2t.top10_overlap"] = len(set(lg.topk(10).indices.tolist()) & set(top.tolist()))
    t0 = time.time()
    _, gen = model.generate_text(prompt, max_new_tokens=io["i2t.generated"].numel(), return_ids=True)
    _log(f"ours greedy {gen[0]} in {time.time() - t0:.0f} s")
    figs["i2t.generated"] = [gen[0], io["i2t.generated"].tolist()]
    t = T2I
    dummy = io["t2i.dummy"].float() / 255
    figs["t2i.ids_equal"] = G.prompt_ids(model, t["prompt"], image=True).tolist() == io["t2i.input_ids"].tolist()
    for n in range(t["steps"]):
        x = _latent(io["t2i.x_t"][n])[None]
        tn = float(io["t2i.t"][n])
        t0 = time.time()
        with torch.no_grad():       # G.velocity is differentiable (RL): no graph of a 2.6B model here
            v_c = G.velocity(model, t["prompt"], x, tn, cfg_scale=1.0, dummy_image=dummy)
            v_u = G.velocity(model, t["prompt"], x, tn, cfg_scale=0.0, dummy_image=dummy)
        figs[f"t2i.v_cond_rel.{n}"] = _rel(v_c[0], _latent(io["t2i.v_cond"][n]))
        figs[f"t2i.v_uncond_rel.{n}"] = _rel(v_u[0], _latent(io["t2i.v_uncond"][n]))
        _log(f"ours velocities at step {n}: {time.time() - t0:.0f} s", figs[f"t2i.v_cond_rel.{n}"],
             figs[f"t2i.v_uncond_rel.{n}"])
    t0 = time.time()
    out = model.generate_image(t["prompt"], steps=t["steps"], cfg_scale=t["cfg_scale"], time_shift=t["alpha"],
                               init_noise=_latent(io["t2i.init_noise"])[None], dummy_image=dummy)
    _log(f"ours text-to-image {time.time() - t0:.0f} s")
    figs["t2i.timesteps_equal"] = bool(torch.equal(out["timesteps"].double(), io["t2i.t"]))
    figs["t2i.latent_rel"] = _rel(out["latents"][0], _latent(io["t2i.latent"]))
    figs["t2i.pixels_rel"] = _rel(out["images"][0], io["t2i.pixels"])
    figs["t2i.pixels_max_abs"] = float((out["images"][0].double() - io["t2i.pixels"].double()).abs().max())
    figs["t2i.pixels_mean_abs"] = float((out["images"][0].double() - io["t2i.pixels"].double()).abs().mean())
    _log("figures", json.dumps(figs, indent=1))
    result = dict(
        what="scripts/check_cheers_full_size.py: the released Cheers class (AI9Stars/Cheers da1cb77) at its released "
             "config.json with random bf16 weights, saved in the released layout, loaded by from_cheers_checkpoint"
             "(dtype=bfloat16); ours vs the released code on the same weights, both bf16, CPU",
        inputs=dict(t2i=T2I, question=QUESTION, seed=SEED, resolution=res),
        released=rec, ours=ours_rec, figures=figs, torch=torch.__version__, peak_rss_gb_ours_phase=_rss_gb())
    prev = {}
    if os.path.isfile(OUT_JSON):
        with open(OUT_JSON) as f:
            prev = json.load(f)
    result["peak_rss_gb_released_phase"] = prev.get("_released_peak", prev.get("peak_rss_gb_released_phase"))
    result["figures"].update({k: v for k, v in prev.get("figures", {}).items() if k.startswith("released_spread.")})
    os.makedirs(os.path.dirname(OUT_JSON), exist_ok=True)
    with open(OUT_JSON, "w") as f:
        json.dump(result, f, indent=1)
    _log(f"wrote {OUT_JSON}")


def main():
    folder = sys.argv[2] if len(sys.argv) > 2 else "/tmp/cheers_full_size"
    io_path = folder.rstrip("/") + "_io.pt"
    src = os.environ.get("CHEERS_SRC", "/tmp/cheers/Training/cheers_config")
    deps = os.environ.get("CHEERS_DEPS", "/tmp/rec_pkgs")
    phase = sys.argv[1] if len(sys.argv) > 1 else "all"
    if phase == "spread":
        phase_spread(src, deps, folder, io_path)
    elif phase == "shapes":
        phase_shapes(src, deps)
    elif phase == "released":
        phase_released(src, deps, folder, io_path)
        print(f"RELEASED_PEAK_GB {_rss_gb():.2f}")
    elif phase == "ours":
        phase_ours(folder, io_path)
    elif phase == "all":
        r = subprocess.run([sys.executable, __file__, "released", folder], stdout=subprocess.PIPE, text=True,
                           stdin=subprocess.DEVNULL)
        print(r.stdout, end="")
        if r.returncode:
            sys.exit(r.returncode)
        peak = float(r.stdout.rsplit("RELEASED_PEAK_GB", 1)[1].split()[0])
        os.makedirs(os.path.dirname(OUT_JSON), exist_ok=True)
        with open(OUT_JSON, "w") as f:
            json.dump({"_released_peak": peak}, f)
        sys.exit(subprocess.call([sys.executable, __file__, "ours", folder], stdin=subprocess.DEVNULL))
    else:
        sys.exit(f"usage: {sys.argv[0]} [all|released|ours|spread|shapes] [FOLDER]")


if __name__ == "__main__":
    main()
