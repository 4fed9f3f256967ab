"""The SigLIP vision tower on span attention (umm_ops.model.vit / hf): parity with transformers' SiglipVisionModel
loaded from folders the test writes (vision-only and full SigLIP checkpoints), resized position embeddings, patch
embeddings, images not interacting, gradients, save/load and errors.

Tolerances as in test_model_llm.py: float64 results of the two implementations differ by rounding only (bound
1e-10 of the output scale); float32 follows tests/tolerance.py (2x transformers' own float32 error + 32 ulps).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from umm_ops.model.hf import load_siglip, save_hf_siglip
from umm_ops.model.vit import SiglipViT, SiglipVisionConfig
from tolerance import assert_close_rule

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
            image_size=16)


def hf_vision(**kw):
    cfg = transformers.SiglipVisionConfig(**(TINY | kw))
    m = transformers.SiglipVisionModel(cfg).eval()
    with torch.no_grad():  # biases and LayerNorms start at 0 / 1: make every parameter matter
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return m


def close64(a, b, name):
    scale = max(1.0, b.abs().max().item())
    err = (a.double() - b.double()).abs().max().item()
    assert err <= 1e-10 * scale, f"{name}: float64 error {err:.3e} > {1e-10 * scale:.3e}"


def pixels(n, h, w, dtype=torch.float32):
    return torch.rand(n, 3, h, w, dtype=dtype) * 2 - 1


@pytest.mark.parametrize("hw", [(16, 16), (24, 24), (16, 28)], ids=["native", "larger", "non-square"])
def test_matches_transformers(tmp_path, hw, seed):
    ref = hf_vision()
    ref.save_pretrained(tmp_path)                      # transformers 5: tensor names without "vision_model."
    m32, m64 = load_siglip(tmp_path), load_siglip(tmp_path, dtype=torch.float64)
    H, W = hw
    px = pixels(3, H, W)
    interp = hw != (16, 16)
    with torch.no_grad():
        ours32, ours64 = m32(px), m64(px.double())
        hf32 = ref(px, interpolate_pos_encoding=interp).last_hidden_state
        ref.double()
        hf64 = ref(px.double(), interpolate_pos_encoding=interp).last_hidden_state
        assert ours32.shape == (3, (H // 4) * (W // 4), 32)
        close64(ours64, hf64, "last hidden state")
        assert_close_rule(ours32, hf64, hf32, torch.float32, "float32 last hidden state")
        # the patch embedding alone (Cheers' HiGate input) and patch + position (the encoder input)
        pe = ref.embeddings.patch_embedding(px.double()).flatten(2).transpose(1, 2)
        close64(m64.patch_embed(px.double()), pe, "patch_embed")
        close64(m64.embed(px.double()), ref.embeddings(px.double(), interpolate_pos_encoding=interp), "embed")


def test_loads_full_siglip_checkpoint_and_round_trips(tmp_path, seed):
    text = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    full = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=TINY)).eval()
    full.save_pretrained(tmp_path / "full")            # vision_model.*, text_model.*, logit_scale, head
    m = load_siglip(tmp_path / "full", dtype=torch.float64)
    px = pixels(2, 16, 16, torch.float64)
    with torch.no_grad():
        ref = full.double().vision_model(px).last_hidden_state
        close64(m(px), ref, "full SigLIP checkpoint")
        save_hf_siglip(m, tmp_path / "ours")
        back = load_siglip(tmp_path / "ours", dtype=torch.float64)
        for (n1, a), (n2, b) in zip(m.state_dict().items(), back.state_dict().items()):
            assert n1 == n2 and torch.equal(a, b), n1
        hf = transformers.SiglipVisionModel.from_pretrained(tmp_path / "ours").double().eval()
        close64(hf(px).last_hidden_state, ref, "our folder loaded by transformers")
    assert all(k.startswith("vision_model.") for k in m.state_dict())


def test_images_do_not_interact_and_gradients_flow(seed):
    m = SiglipViT(SiglipVisionConfig(**TINY)).double()
    px = pixels(4, 16, 16, torch.float64)
    with torch.no_grad():
        batch = m(px)
        alone = torch.cat([m(px[i:i + 1]) for i in range(4)])
        close64(batch, alone, "batch vs alone")
        px2 = px.clone()
        px2[2] = pixels(1, 16, 16, torch.float64)[0]
        out2 = m(px2)
        assert torch.equal(out2[[0, 1, 3]], batch[[0, 1, 3]]) and not torch.allclose(out2[2], batch[2])
    m.train()
    m(px).pow(2).mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    m.zero_grad()
    m.gradient_checkpointing = True
    m(px).pow(2).mean().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_config_round_trip_and_errors(tmp_path):
    c = SiglipVisionConfig(**TINY)
    assert SiglipVisionConfig.from_hf(c.to_hf()) == c
    assert SiglipVisionConfig.from_hf({"model_type": "siglip", "vision_config": c.to_hf()}) == c
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        SiglipVisionConfig(**(TINY | {"num_attention_heads": 5}))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        SiglipVisionConfig(**(TINY | {"image_size": 18}))
    with pytest.raises(ValueError, match="hidden_act"):
        SiglipVisionConfig(**TINY, hidden_act="relu6")
    with pytest.raises(ValueError, match="NaFlex"):
        SiglipVisionConfig.from_hf(c.to_hf() | {"model_type": "siglip2_vision_model"})
    m = SiglipViT(c)
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        m(pixels(1, 16, 18))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        m(torch.rand(1, 4, 16, 16))
    with pytest.raises(TypeError, match="floating"):
        m(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    # a checkpoint missing weights names them
    from safetensors.torch import load_file, save_file

    save_hf_siglip(m, tmp_path / "ok")
    sd = load_file(tmp_path / "ok" / "model.safetensors")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    save_file({k: v for k, v in sd.items() if "layers.1.mlp.fc2" not in k}, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"2 weights missing.*vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        load_siglip(bad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_transformers(tmp_path, dtype, seed):
    ref = hf_vision(hidden_size=64)                    # head dim 16
    ref.save_pretrained(tmp_path)
    px = pixels(3, 16, 16)
    with torch.no_grad():
        hf64 = ref.double()(px.double()).last_hidden_state
        hf_low = ref.to(dtype).cuda()(px.to(dtype).cuda()).last_hidden_state.cpu()
        ours = load_siglip(tmp_path, dtype=dtype, device="cuda")(px.to(dtype).cuda()).cpu()
    assert_close_rule(ours, hf64, hf_low, dtype, f"cuda {dtype} last hidden state")
