"""Record tests/fixtures/cheers_released.{safetensors,json} by running the RELEASED Cheers code on a tiny random model.

Provenance: github.com/AI9Stars/Cheers at commit da1cb77e4d102820ccc496fe1f3a72dfd400cd96, the files
Training/cheers_config/{configuration_umm,modeling_umm,processing_umm,image_processing_umm}.py (the remote code that
Inference/T2I.py, I2T.py and T2T.py load with trust_remote_code).  They need transformers 4.51 (the checkpoint's
"transformers_version": "4.51.3"; transformers 5 removed APIs they import) and einops, installed OUTSIDE the project
venv, e.g.

    .venv/bin/python -m pip install --target /tmp/rec_pkgs --no-deps transformers==4.51.3 tokenizers==0.21.1 \
        huggingface_hub==0.30.2 einops
    CHEERS_SRC=<folder with the four files> CHEERS_DEPS=/tmp/rec_pkgs .venv/bin/python scripts/record_cheers_fixtures.py

What is changed in the released code, and why (nothing else is):
  * imports it never uses (black.Mode, param.output, networkx.to_numpy_array, scipy.special,
    torchvision.utils.save_image) are stubbed when the package is not installed;
  * modeling_umm.py hard-codes two casts to bfloat16 (UMMUndProjector.forward `x = x.to(torch.bfloat16)`, line 1311,
    and UMMModel.get_image_features `xt = xt.to(torch.bfloat16)`, line 1874).  The released checkpoint runs in
    bfloat16, where both are no-ops; in float32 the first makes the projector's Linear fail (bf16 input, fp32
    weight).  Both are replaced by a cast to the model's own dtype, which is the identity in bfloat16 - the
    released behaviour at the released dtype - and lets the tiny model run in float32.
The model: the released classes (UMMConfig / Cheers, sdpa attention, as transformers 4.51 picks for it) at a tiny
size; its weights are overwritten with tests/helpers/cheers_released.tiny_released_state(names, SEED) so the
fixture stores only names, shapes and outputs.  The tokenizer: tests/helpers/cheers_released.write_qwen_like_tokenizer
(Qwen2.5's special ids and the released chat template; byte tokens, no merges).

Recorded (float32): text-to-image with CFG (the processor's ids, both branches' ids as _build_uncond_full_ids builds
them, the dummy image, per-step t / x_t / conditional and unconditional velocities from _drift_fn, the final latent
and the decoded pixels clamped to [0, 1] as Inference/T2I.py does), editing (generate(edit_image=True): the initial
noise, per-step t and x_t, final latent and pixels), image understanding (ids, pixels, first-token
logits, greedy continuation) and text-only chat (same).

`python scripts/record_cheers_fixtures.py train` records instead tests/fixtures/cheers_released_train.{safetensors,
json}: the released TRAINING forward (Cheers.forward with labels) of a text-only chat sample as
Training/tasks/omni/train_cheers.py ``process_sample`` prepares it - no image in the sample, so a 512 x 512 black
image through the processor's understanding path (here at the tiny model's resolution, as the processor's
scale_resolution sets it) and t = [0.0] - with the ids and labels of a system / user / assistant chat whose assistant
turn is the target (written here piece by piece as the project's packer lays out a chat: the released data pipeline's
veomni chat template is not run).  Recorded: ids, labels, pixel values, the flow noise x0 drawn inside
get_image_features, the head's output on the black image's tokens, its target, text loss, image loss, the total
loss, and the gradient norms of the head (gen_projector, hi_gate, hi_projector) and of the embedding.

`python scripts/record_cheers_fixtures.py bf16` records tests/fixtures/cheers_released_bf16.{safetensors,json}: the
released model at the BF16 size (TINY with head_dim 64 in the LLM and the ViT) run once in float32 and once after
``model.to(torch.bfloat16)`` - where the two cast lines above are the released ones again - on the same seeded
weights and inputs: text-to-image with CFG (3 steps, the initial noise given through torch.randn and
bf16-representable, so both dtypes start from the same numbers; the first conditional velocity, the final latent and
the clamped pixels), image understanding and text-only chat (first-token logits, greedy continuation), the
first-token logits of a long text-only prompt (~2150 positions; ``model.to(torch.bfloat16)`` - what the released
Inference/*.py scripts run - rounds transformers' float32 RoPE inv_freq buffers to bf16, which shows there), and the
training forward of the text-only chat sample above (head output, text / image / total loss; no backward).  The JSON
holds the released code's own bf16-vs-float32 relative errors (``released_bf16_error``): tests/test_cheers_bf16.py
holds ours to them.
"""
import importlib
import importlib.machinery
import os
import shutil
import sys
import tempfile
import types

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))
from cheers_released import tiny_released_state, write_qwen_like_tokenizer  # noqa: E402

SOURCE = dict(repo="AI9Stars/Cheers", commit="da1cb77e4d102820ccc496fe1f3a72dfd400cd96",
              files=[f"Training/cheers_config/{n}.py" for n in
                     ("configuration_umm", "modeling_umm", "processing_umm", "image_processing_umm")])
SEED = 1234
RES = 64
TINY = dict(
    text_config=dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                     max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6),
    vision_representation_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, patch_size=16, image_size=RES, num_channels=3,
                                      layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
    vae_encoder_config=dict(resolution=RES, ch=128, ch_mult=[1, 1, 1, 1], num_res_blocks=1, z_channels=32),
    vae_decoder_config=dict(resolution=RES, ch=128, ch_mult=[1, 1, 1, 1], num_res_blocks=1, z_channels=32),
)


def load_released(src: str, deps: str):
    sys.path.insert(0, deps)
    for name, attrs in (("black", {"Mode": None}), ("param", {"output": None}),
                        ("networkx", {"to_numpy_array": None}), ("scipy", {"special": None}),
                        ("torchvision", {}), ("torchvision.utils", {"save_image": None})):
        try:
            importlib.import_module(name)
        except ImportError:
            m = types.ModuleType(name)
            m.__spec__ = importlib.machinery.ModuleSpec(name, None)
            m.__dict__.update(attrs)
            sys.modules[name] = m
    if "torchvision.utils" in sys.modules and not hasattr(sys.modules["torchvision"], "utils"):
        sys.modules["torchvision"].utils = sys.modules["torchvision.utils"]
    pkg = tempfile.mkdtemp(prefix="cheers_remote_")
    os.makedirs(os.path.join(pkg, "cheers_remote"))
    open(os.path.join(pkg, "cheers_remote", "__init__.py"), "w").close()
    for f in SOURCE["files"]:
        name = os.path.basename(f)
        text = open(os.path.join(src, name)).read()
        if name == "modeling_umm.py":
            casts = [("        x = x.to(torch.bfloat16)\n", "        x = x.to(self.layernorm.weight.dtype)\n"),
                     ("        xt = xt.to(torch.bfloat16)\n",
                      "        xt = xt.to(self.vae_model.encoder.quant_conv.weight.dtype)\n")]
            for old, new in casts:
                assert text.count(old) == 1, f"expected the released line {old.strip()!r} once"
                text = text.replace(old, new)
            assert "torch.bfloat16" not in text
        with open(os.path.join(pkg, "cheers_remote", name), "w") as g:
            g.write(text)
    sys.path.insert(0, pkg)
    import transformers

    assert transformers.__version__.startswith("4.51"), transformers.__version__
    mods = {n: importlib.import_module(f"cheers_remote.{n}") for n in
            ("configuration_umm", "modeling_umm", "processing_umm", "image_processing_umm")}
    return mods, pkg


TRAIN_TURNS = (("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nSay hello.<|im_end|>"
                "\n<|im_start|>assistant\n", False), ("Hello there!<|im_end|>", True), ("\n", False))


def record_train_text_only(mods, model, tok, improc, out_path):
    """The released training forward of a text-only sample (see the module docstring)."""
    from PIL import Image

    ids, labels = [], []
    for text, trained in TRAIN_TURNS:
        t_ids = tok(text, add_special_tokens=False)["input_ids"]
        ids += t_ids
        labels += t_ids if trained else [-100] * len(t_ids)
    # train_cheers.py process_sample: no image -> np.zeros((512, 512, 3)) through image_processor(images=...) (und),
    # and t = [0.0] (no image token in the ids)
    info = improc(images=Image.fromarray(np.zeros((512, 512, 3), dtype=np.uint8)))
    pixel_values, grid_hws = info["pixel_values"].float(), info["grid_hws"]
    noises = []
    real = torch.randn_like

    def rec_randn_like(x, *a, **k):     # get_image_features' flow noise x0 = torch.randn_like(image_latent)
        z = real(x, *a, **k)
        noises.append(z.detach().clone())
        return z

    torch.manual_seed(SEED + 4)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.randn_like = rec_randn_like
    try:
        out = model(input_ids=torch.tensor([ids]), t=torch.tensor([0.0]), labels=torch.tensor([labels]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long), pixel_values=pixel_values,
                    grid_hws=grid_hws)
    finally:
        torch.randn_like = real
    assert len(noises) == 1, len(noises)
    out.loss.backward()
    grads = {}
    for name in ("model.gen_projector", "model.hi_gate", "model.hi_projector", "model.language_model.embed_tokens"):
        gs = [p.grad.double().pow(2).sum() for n, p in model.named_parameters() if n.startswith(name + ".")
              and p.grad is not None]
        assert gs, name
        grads[name] = float(torch.stack(gs).sum().sqrt())
    model.eval()
    # image_latent (B, C, H, W) is the head's output as an image; image_latent_label the target x1 - x0 (tokens)
    v = out.image_latent.detach()[0].flatten(1).transpose(0, 1).clone()
    target = out.image_latent_label[0].detach().clone()
    rec = dict(turns=TRAIN_TURNS, grad_norms=grads, text_loss=float(out.text_loss), image_loss=float(out.image_loss),
               loss=float(out.loss))
    tensors = dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels), pixel_values=pixel_values[0].clone(),
                   noise=noises[0][0].flatten(1).transpose(0, 1).contiguous(), v=v.contiguous(),
                   target=target.contiguous())
    from safetensors.torch import save_file
    import json

    save_file(tensors, out_path + ".safetensors")
    with open(out_path + ".json", "w") as f:
        json.dump(dict(source=SOURCE, seed=SEED, config=TINY, resolution=RES, case=rec,
                       transformers=__import__("transformers").__version__, torch=torch.__version__), f, indent=1)
    print("train", {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}, rec)


# bf16 mode: widths the CPU bf16 kernels like (head_dim 64 in the LLM and the ViT, multiples of 64 elsewhere), still
# tiny; the rest as TINY
BF16 = dict(
    text_config=dict(TINY["text_config"], hidden_size=128, intermediate_size=256, num_attention_heads=2,
                     num_key_value_heads=1),
    vision_representation_config=dict(TINY["vision_representation_config"], hidden_size=64, intermediate_size=128,
                                      num_attention_heads=1),
    vae_encoder_config=TINY["vae_encoder_config"], vae_decoder_config=TINY["vae_decoder_config"])
BF16_T2I = dict(prompt="A red cube on a blue floor.", steps=3, cfg_scale=3.0, alpha=0.5)
BF16_LONG = " ".join(f"item {i} is a small {['red', 'green', 'blue'][i % 3]} cube." for i in range(70))


def _rel(a, b):
    """max |a - b| / max |b| (b the float32 reference)"""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def record_bf16(mods, tok, out_path):
    """The released model in float32 and in bfloat16 (``model.to(torch.bfloat16)``: where the released code's two
    hard-coded bf16 casts, replaced here by casts to the model's dtype, are the released ones again) on the same
    seeded weights and inputs: text-to-image with CFG from given initial noise (the final latent and pixels, and the
    first step's conditional velocity), image understanding and text-only chat (first-token logits and greedy
    continuation), and the training forward of the text-only chat sample (losses and the head's output).  The initial
    and flow noise are bf16-representable, so both dtypes start from the same numbers."""
    from PIL import Image

    cfg = mods["configuration_umm"].UMMConfig(**BF16)
    model = mods["modeling_umm"].Cheers._from_config(cfg, attn_implementation="sdpa", torch_dtype=torch.float32)
    model.eval()
    names = {k: list(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(tiny_released_state(names, SEED), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    improc = mods["image_processing_umm"].UMMImageProcessor(scale_resolution=RES, patch_size=16)
    proc = mods["processing_umm"].UMMProcessor(image_processor=improc, tokenizer=tok)

    def chat(content):
        return proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                        add_generation_prompt=True)

    # the inputs, drawn once (the processor draws the dummy images with np.random)
    np.random.seed(SEED)
    t2i_in = proc(text=[chat(BF16_T2I["prompt"])], images=[None], return_tensors="pt", add_im_start_id=True)
    rng = np.random.RandomState(SEED + 1)
    img = Image.fromarray(rng.randint(0, 256, (40, 96, 3), dtype=np.uint8))
    i2t_content = "<im_start><image><im_end>\n Describe this image."
    i2t_in = proc(text=[chat(i2t_content)], images=[img], return_tensors="pt", add_im_start_id=False)
    np.random.seed(SEED + 2)
    t2t_content = "Please introduce yourself briefly."
    t2t_in = proc(text=[chat(t2t_content)], images=[None], return_tensors="pt", add_im_start_id=False)
    np.random.seed(SEED + 3)       # a long text-only prompt (~2150 positions: where RoPE's rounding shows)
    long_in = proc(text=[chat(BF16_LONG)], images=[None], return_tensors="pt", add_im_start_id=False)
    ids, labels = [], []
    for text, trained in TRAIN_TURNS:
        t_ids = tok(text, add_special_tokens=False)["input_ids"]
        ids += t_ids
        labels += t_ids if trained else [-100] * len(t_ids)
    black = improc(images=Image.fromarray(np.zeros((512, 512, 3), dtype=np.uint8)))
    h, w = (int(v) for v in t2i_in["grid_hws"][0])
    z0 = torch.randn((1, 128, h, w), generator=torch.Generator().manual_seed(SEED + 5)).bfloat16().float()
    hb, wb = (int(v) for v in black["grid_hws"][0])             # the packed latent of the black image
    zt = torch.randn((1, 128, hb, wb), generator=torch.Generator().manual_seed(SEED + 6)).bfloat16().float()

    def run(dt):
        model.to(dt)
        r = {}
        real_randn, real_randn_like = torch.randn, torch.randn_like
        drift_fn, decode = model._drift_fn, model.model.vae_model.decode
        v_cond, latents = [], []

        def fixed_randn(*a, **k):
            assert tuple(a[0]) == tuple(z0.shape) and k.get("dtype") == dt, (a, k)
            return z0.to(dt).clone()

        def rec_drift(x_t, t, *a, **k):
            out = drift_fn(x_t, t, *a, **k)
            if k.get("out_heat_map"):
                v_cond.append(out[0].detach().float().clone())
            return out

        def rec_decode(z):
            latents.append(z.detach().float().clone())
            return decode(z)

        model._drift_fn, model.model.vae_model.decode = rec_drift, rec_decode
        torch.randn = fixed_randn
        try:
            with torch.no_grad():
                g = model.generate(**dict(t2i_in), max_length=0, cfg_scale=BF16_T2I["cfg_scale"], temperature=0.0,
                                   num_inference_steps=BF16_T2I["steps"], alpha=BF16_T2I["alpha"], edit_image=False)
        finally:
            torch.randn = real_randn
            model._drift_fn, model.model.vae_model.decode = drift_fn, decode
        assert len(latents) == 1 and len(v_cond) == BF16_T2I["steps"] and g["images"][0].dtype == dt
        r["t2i.v_cond0"] = v_cond[0][0]
        r["t2i.latent"] = latents[0][0]
        r["t2i.pixels"] = g["images"][0][0].float().clamp(0.0, 1.0)
        for key, inputs in (("i2t", i2t_in), ("t2t", t2t_in)):
            with torch.no_grad():
                out = model(**{k: v for k, v in inputs.items()})
                gen = model.generate(**dict(inputs), max_length=6, temperature=0.0)
            r[f"{key}.logits"] = out.logits[0, -1].float()
            r[f"{key}.generated"] = gen["input_ids"][0].clone()
        with torch.no_grad():
            r["long.logits"] = model(**{k: v for k, v in long_in.items()}).logits[0, -1].float()

        def fixed_randn_like(x, *a, **k):
            assert x.shape == zt.shape and x.dtype == dt, (x.shape, x.dtype)
            return zt.to(dt).clone()

        model.train()
        torch.randn_like = fixed_randn_like
        try:
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids]), t=torch.tensor([0.0]), labels=torch.tensor([labels]),
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            pixel_values=black["pixel_values"].float(), grid_hws=black["grid_hws"])
        finally:
            torch.randn_like = real_randn_like
            model.eval()
        r["train.v"] = out.image_latent.detach()[0].float().flatten(1).transpose(0, 1).contiguous()
        r["train.losses"] = torch.tensor([float(out.text_loss), float(out.image_loss), float(out.loss)],
                                         dtype=torch.float64)
        return r

    f32 = run(torch.float32)
    b16 = run(torch.bfloat16)
    tensors = dict(t2i_input_ids=t2i_in["input_ids"][0].clone(),
                   t2i_dummy=(t2i_in["pixel_values"][0] * 255).round().to(torch.uint8),
                   t2t_dummy=(t2t_in["pixel_values"][0] * 255).round().to(torch.uint8),
                   long_dummy=(long_in["pixel_values"][0] * 255).round().to(torch.uint8),
                   long_input_ids=long_in["input_ids"][0].clone(),
                   i2t_input_ids=i2t_in["input_ids"][0].clone(), t2t_input_ids=t2t_in["input_ids"][0].clone(),
                   image=torch.from_numpy(np.asarray(img).copy()), init_noise=z0[0].clone(),
                   train_input_ids=torch.tensor(ids), train_labels=torch.tensor(labels),
                   train_noise=zt[0].clone())
    err = {}
    for k in f32:
        if k.endswith(".logits"):           # keep the top 32 (float32) and every 301st id, and the log-sum-exp
            case = k.split(".")[0]
            lid = sorted(set(f32[k].topk(32).indices.tolist()) | set(range(0, f32[k].numel(), 301)))
            tensors[f"{case}_logit_ids"] = torch.tensor(lid)
            for name, r in (("f32", f32), ("bf16", b16)):
                tensors[f"{name}.{k}"] = r[k][lid].clone()
                tensors[f"{name}.{case}.logsumexp"] = torch.logsumexp(r[k].double(), 0).reshape(1)
            err[k] = _rel(b16[k], f32[k])
            err[f"{case}.logsumexp"] = _rel(torch.logsumexp(b16[k].double(), 0), torch.logsumexp(f32[k].double(), 0))
            continue
        tensors[f"f32.{k}"], tensors[f"bf16.{k}"] = f32[k].contiguous(), b16[k].contiguous()
        if k.endswith(".generated"):
            err[k] = int((b16[k] != f32[k]).sum()) if b16[k].shape == f32[k].shape else -1
        elif k == "train.losses":
            err[k] = [abs(float(a) - float(b)) / abs(float(b)) for a, b in zip(b16[k], f32[k])]
        else:
            err[k] = _rel(b16[k], f32[k])
    from safetensors.torch import save_file
    import json

    save_file(tensors, out_path + ".safetensors")
    with open(out_path + ".json", "w") as f:
        json.dump(dict(source=SOURCE, seed=SEED, config=BF16, names=names, resolution=RES, t2i=BF16_T2I,
                       i2t_content=i2t_content, t2t_content=t2t_content, long_content=BF16_LONG,
                       train_turns=TRAIN_TURNS,
                       released_bf16_error=err, transformers=__import__("transformers").__version__,
                       torch=torch.__version__), f, indent=1)
    for ext in (".safetensors", ".json"):
        print(f"wrote {out_path + ext} ({os.path.getsize(out_path + ext)} bytes)")
    print(json.dumps(err, indent=1))
    for k in ("i2t.generated", "t2t.generated"):
        print(k, f32[k].tolist(), b16[k].tolist())


def main():
    src = os.environ.get("CHEERS_SRC", "/tmp/cheers/Training/cheers_config")
    deps = os.environ.get("CHEERS_DEPS", "/tmp/rec_pkgs")
    out_path = os.path.join(ROOT, "tests", "fixtures", "cheers_released")
    torch.set_num_threads(1)
    mods, pkg = load_released(src, deps)
    from transformers import AutoTokenizer

    cfg = mods["configuration_umm"].UMMConfig(**TINY)
    model = mods["modeling_umm"].Cheers._from_config(cfg, attn_implementation="sdpa", torch_dtype=torch.float32)
    model.eval()
    sd = model.state_dict()
    names = {k: list(v.shape) for k, v in sd.items() if k != "lm_head.weight"}   # lm_head is tied to the embedding
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    state = tiny_released_state(names, SEED)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)

    tokdir = tempfile.mkdtemp(prefix="qwen_like_")
    write_qwen_like_tokenizer(tokdir)
    tok = AutoTokenizer.from_pretrained(tokdir)
    improc = mods["image_processing_umm"].UMMImageProcessor(scale_resolution=RES, patch_size=16)
    proc = mods["processing_umm"].UMMProcessor(image_processor=improc, tokenizer=tok)
    added = tok.convert_tokens_to_ids(["<image>", "<image_gen>", "<im_start>", "<im_end>", "<no_mean>"])
    assert added == [151665, 151666, 151667, 151668, 151669], added
    if sys.argv[1:] == ["bf16"]:
        record_bf16(mods, tok, out_path + "_bf16")
        shutil.rmtree(pkg, ignore_errors=True)
        shutil.rmtree(tokdir, ignore_errors=True)
        return
    if sys.argv[1:] == ["train"]:
        record_train_text_only(mods, model, tok, improc, out_path + "_train")
        shutil.rmtree(pkg, ignore_errors=True)
        shutil.rmtree(tokdir, ignore_errors=True)
        return

    rec = dict(source=SOURCE, seed=SEED, config=TINY, names=names, resolution=RES,
               transformers=__import__("transformers").__version__, torch=torch.__version__)

    # ---------------------------------------------------------------- text-to-image with CFG (Inference/T2I.py)
    prompt = "A red cube on a blue floor."
    np.random.seed(SEED)          # the processor's dummy image: np.random.randint(0, 256, (256, 256, 3))
    torch.manual_seed(SEED)
    text = proc.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                    add_generation_prompt=True)
    inputs = proc(text=[text], images=[None], return_tensors="pt", add_im_start_id=True)
    calls, uncond = [], []
    drift_fn, build_uncond = model._drift_fn, model._build_uncond_full_ids

    def rec_drift(x_t, t, *a, **k):
        r = drift_fn(x_t, t, *a, **k)
        calls.append(dict(x_t=x_t.detach().clone(), t=float(t), v=r[0].detach().clone()))
        return r

    def rec_uncond(ids):
        u = build_uncond(ids)
        uncond.append(u.clone())
        return u

    model._drift_fn, model._build_uncond_full_ids = rec_drift, rec_uncond
    steps, scale, alpha = 4, 3.0, 0.5
    with torch.no_grad():
        g = model.generate(**dict(inputs), max_length=0, cfg_scale=scale, temperature=0.0,
                           num_inference_steps=steps, alpha=alpha, edit_image=False)
    model._drift_fn, model._build_uncond_full_ids = drift_fn, build_uncond
    assert len(calls) == 2 * steps and len(g["images"]) == 1
    cond, unc = calls[0::2], calls[1::2]
    # the final latent, recomputed from the recorded calls with the released update (checks the recording)
    x_last = cond[-1]["x_t"] + (unc[-1]["v"] + scale * (cond[-1]["v"] - unc[-1]["v"])) / steps
    image = g["images"][0]
    with torch.no_grad():
        latent = None
        # generate() returns only the decoded image; decode(latent) must reproduce it exactly
        assert torch.equal(model.model.vae_model.decode(x_last), image)
        latent = x_last
    rec["t2i"] = dict(prompt=prompt, text=text, steps=steps, cfg_scale=scale, alpha=alpha,
                      input_ids=inputs["input_ids"][0].clone(), uncond_ids=uncond[0][0].clone(),
                      dummy=(inputs["pixel_values"][0] * 255).round().to(torch.uint8),
                      t=torch.tensor([c["t"] for c in cond], dtype=torch.float64),
                      x_t=torch.stack([c["x_t"][0] for c in cond]),
                      v_cond=torch.stack([c["v"][0] for c in cond]), v_uncond=torch.stack([c["v"][0] for c in unc]),
                      latent=latent[0].clone(), pixels=image[0].clamp(0.0, 1.0).clone())
    for c, u in zip(cond, unc):
        assert torch.equal(c["x_t"], u["x_t"])

    # ---------------------------------------------------------------- editing (generate(edit_image=True))
    from PIL import Image

    rng = np.random.RandomState(SEED + 3)
    img = Image.fromarray(rng.randint(0, 256, (80, 80, 3), dtype=np.uint8))
    content = "<im_start><image><im_end>\n Make it red."
    text = proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                    add_generation_prompt=True)
    inputs = proc(text=[text], images=[img], return_tensors="pt", add_im_start_id=True)
    calls, uncond, noises = [], [], []
    real_randn = torch.randn

    def rec_randn(*a, **k):       # the initial noise of the edit path: torch.randn((B, 128, h, w), ...)
        z = real_randn(*a, **k)
        noises.append(z.clone())
        return z

    model._drift_fn, model._build_uncond_full_ids = rec_drift, rec_uncond
    torch.manual_seed(SEED + 3)
    torch.randn = rec_randn
    try:
        with torch.no_grad():
            g = model.generate(**dict(inputs), max_length=0, cfg_scale=2.0, temperature=0.0, num_inference_steps=5,
                               alpha=0.5, edit_image=True)
    finally:
        torch.randn = real_randn
        model._drift_fn, model._build_uncond_full_ids = drift_fn, build_uncond
    assert len(noises) == 1 and len(calls) == 2 * 4, (len(noises), len(calls))
    cond, unc = calls[0::2], calls[1::2]
    x_last = cond[-1]["x_t"] + (unc[-1]["v"] + 2.0 * (cond[-1]["v"] - unc[-1]["v"])) / 4
    with torch.no_grad():
        assert torch.equal(model.model.vae_model.decode(x_last), g["images"][0])
    rec["edit"] = dict(content=content, text=text, steps=5, cfg_scale=2.0, alpha=0.5, start_t=0.1,
                       image=torch.from_numpy(np.asarray(img).copy()), input_ids=inputs["input_ids"][0].clone(),
                       uncond_ids=uncond[0][0].clone(), pixels_in=inputs["pixel_values"][0].clone(),
                       noise=noises[0][0].clone(), t=torch.tensor([c["t"] for c in cond], dtype=torch.float64),
                       x_t=torch.stack([c["x_t"][0] for c in cond]), latent=x_last[0].clone(),
                       pixels=g["images"][0][0].clamp(0.0, 1.0).clone())

    # ---------------------------------------------------------------- image understanding (Inference/I2T.py)

    rng = np.random.RandomState(SEED + 1)
    img = Image.fromarray(rng.randint(0, 256, (40, 96, 3), dtype=np.uint8))   # 96 x 40 (w x h): letterboxed
    content = "<im_start><image><im_end>\n Describe this image."
    text = proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                    add_generation_prompt=True)
    inputs = proc(text=[text], images=[img], return_tensors="pt", add_im_start_id=False)
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items()})
        g = model.generate(**dict(inputs), max_length=6, temperature=0.0)
    rec["i2t"] = dict(content=content, text=text, image=torch.from_numpy(np.asarray(img).copy()),
                      input_ids=inputs["input_ids"][0].clone(), pixels=inputs["pixel_values"][0].clone(),
                      logits=out.logits[0, -1].clone(), generated=g["input_ids"][0].clone())

    # ---------------------------------------------------------------- text-only chat (Inference/T2T.py)
    np.random.seed(SEED + 2)
    content = "Please introduce yourself briefly."
    text = proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                    add_generation_prompt=True)
    inputs = proc(text=[text], images=[None], return_tensors="pt", add_im_start_id=False)
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items()})
        g = model.generate(**dict(inputs), max_length=6, temperature=0.0)
    rec["t2t"] = dict(content=content, text=text, input_ids=inputs["input_ids"][0].clone(),
                      dummy=(inputs["pixel_values"][0] * 255).round().to(torch.uint8),
                      logits=out.logits[0, -1].clone(), generated=g["input_ids"][0].clone())

    import json

    from safetensors.torch import save_file

    for k in ("i2t", "t2t"):   # first-token logits: the full vector is 0.6 MB; keep the top 32, every 301st id and
        lg = rec[k].pop("logits")                                 # the log-sum-exp over the whole vocabulary
        ids = sorted(set(lg.topk(32).indices.tolist()) | set(range(0, lg.numel(), 301)))
        rec[k]["logit_ids"] = torch.tensor(ids, dtype=torch.int64)
        rec[k]["logits"] = lg[ids].clone()
        rec[k]["logsumexp"] = torch.logsumexp(lg.double(), 0).reshape(1)
    tensors = {f"{k}.{n}": v.contiguous() for k in ("t2i", "edit", "i2t", "t2t") for n, v in rec[k].items()
               if isinstance(v, torch.Tensor)}
    cases = ("t2i", "edit", "i2t", "t2t")
    meta = {k: ({n: v for n, v in rec[k].items() if not isinstance(v, torch.Tensor)} if k in cases else rec[k])
            for k in rec}
    save_file(tensors, out_path + ".safetensors")
    with open(out_path + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(pkg, ignore_errors=True)
    shutil.rmtree(tokdir, ignore_errors=True)
    for ext in (".safetensors", ".json"):
        print(f"wrote {out_path + ext} ({os.path.getsize(out_path + ext)} bytes)")
    for k in ("t2i", "edit", "i2t", "t2t"):
        print(k, {n: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for n, v in rec[k].items()
                  if n not in ("text",)})


if __name__ == "__main__":
    main()
