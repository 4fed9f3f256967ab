"""Checkpoints of CheersModel: exact save/load, atomic writes, sharding, part loaders, released Cheers names."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from umm_ops.data.packing import ImageItem, Sample, TextItem, pack
from umm_ops.model import checkpoint as ck
from umm_ops.model.cheers import CheersModel
from umm_ops.model.config import preset


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(99)
    m = CheersModel("tiny")
    with torch.no_grad():   # every tensor distinct from its init, buffers included
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for name, b in m.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.rand_like(b) + 0.5)
    return m.eval()


def _states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_load_round_trip_is_exact(model, tmp_path):
    folder = tmp_path / "ckpt"
    ck.save_pretrained(model, folder, max_shard_bytes=8 << 20)
    files = sorted(os.listdir(folder))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "config.json" in files and ck.INDEX in files
    index = json.loads((folder / ck.INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert "llm.lm_head.weight" not in index["weight_map"]          # tied: stored once
    loaded = CheersModel.from_pretrained(folder)
    _states_equal(model, loaded)
    assert loaded.llm.lm_head.weight.data_ptr() == loaded.llm.model.embed_tokens.weight.data_ptr()
    b = pack([Sample([TextItem("hi"), ImageItem(torch.zeros(3, 32, 32), "generate")])], model.pack_spec())[0]
    noise = [torch.randn(model.latent_shape((32, 32)), generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        la = model(b, noise=noise)["loss"]
        lb = loaded(b, noise=noise)["loss"]
    assert torch.equal(la, lb)


def test_checkpoint_sits_below_the_model(model, tmp_path):
    """No import circle: checkpoint.py never imports cheers.py at import time (cheers.py imports it at its top);
    CheersModel.from_pretrained passes its class down (a subclass gets itself back)."""
    code = ("import sys; import umm_ops.model.checkpoint as ck; assert 'umm_ops.model.cheers' not in sys.modules; "
            "from umm_ops.model.cheers import CheersModel; assert CheersModel.save_pretrained")
    subprocess.run([sys.executable, "-c", code], check=True)

    class Sub(CheersModel):
        pass

    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    loaded = Sub.from_pretrained(folder)
    assert type(loaded) is Sub and not loaded.training
    assert type(ck.from_pretrained(folder)) is CheersModel
    _states_equal(model, loaded)


def test_save_is_atomic(model, tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    ck.save_pretrained(model, folder)
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "write_safetensors_folder", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save_pretrained(model, folder)
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before   # old checkpoint intact
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]                               # no temporary left behind
    monkeypatch.undo()
    ck.save_pretrained(model, folder)                                             # overwriting works
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_load_errors(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ck.from_pretrained(tmp_path)
    folder = tmp_path / "ckpt"
    ck.save_pretrained(model, folder)
    state = ck.read_safetensors_folder(folder)
    state.pop("head.hi_gate.layer_norm.weight")
    state["something.else"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing keys .*hi_gate.*unexpected keys .*something.else"):
        ck.load_state(model, state)
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        ck.read_safetensors_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ck.read_safetensors_folder(tmp_path / "nope")


def test_released_cheers_names_round_trip(model, tmp_path):
    """A tiny checkpoint written in the released Cheers naming (BFL/LDM VAE names, model.* prefixes, a pooling head
    and the duplicated tied lm_head) loads into the same weights."""
    from conftest import with_cheers_head
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match=r"released Cheers layout has no \['head.context_norm', 'head.conv_stage'\]"):
        ck.to_cheers_state_dict(model)                 # the tiny preset's conv stage is not in Cheers
    model = with_cheers_head(model)                    # Cheers' head, the fixture's weights but the conv stage's
    config = model.config
    state = ck.to_cheers_state_dict(model)
    assert "model.vae_model.encoder.down.0.block.0.conv1.weight" in state
    assert "model.vae_model.decoder.mid.attn_1.q.weight" in state and \
        state["model.vae_model.decoder.mid.attn_1.q.weight"].dim() == 4
    assert "model.vae_decoder_projector.decoder.post_quant_conv.weight" in state
    assert "model.gen_projector.diffusion_head_a.0.adaLN_modulation.1.weight" in state
    state["model.vision_representation.head.probe"] = torch.zeros(1, 1, 192)     # ignored on load
    folder = tmp_path / "released"
    folder.mkdir()
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "umm", "text_config": {}}))
    # the names only: the tiny preset's world tokenizer has no Cheers tokens, so the project's conventions profile
    # (the released one, from_cheers_checkpoint's default, is tested in tests/test_cheers_profile.py)
    loaded = ck.from_cheers_checkpoint(folder, config=config, profile="umm")
    _states_equal(model, loaded)
    with pytest.raises(ValueError, match="profile 'cheers' needs a Hugging Face tokenizer folder"):
        ck.from_cheers_checkpoint(folder, config=config)
    with pytest.raises(ValueError, match="not in the released Cheers layout"):
        ck.convert_cheers_state_dict({"model.mystery.weight": torch.zeros(1)})


def test_released_1_5b_name_set():
    """Names of our cheers-1.5b in the released layout: 1310 tensors = the 1321 of the released index minus the
    11 of SigLIP2's pooling head (probe, attention in_proj w/b, out_proj w/b, layernorm w/b, mlp fc1/fc2 w/b)."""
    with torch.device("meta"):
        m = CheersModel("cheers-1.5b")
    names = set(ck.to_cheers_state_dict(m))
    assert len(names) == 1321 - 11
    for n in ("lm_head.weight", "model.vae_model.bn.num_batches_tracked", "model.hi_gate.gate.2.bias",
              "model.time_embed.mlp_2.2.weight", "model.und_projector.mlp.2.bias",
              "model.hi_projector.diffusion_head_b.norm_final.weight",
              "model.gen_projector.diffusion_head_a.6.attn.k_proj.weight",
              "model.vae_model.decoder.up.3.upsample.conv.weight",
              "model.vae_model.encoder.down.2.downsample.conv.bias",
              "model.vae_model.encoder.quant_conv.weight", "model.vae_decoder_projector.bn.running_var",
              "model.vision_representation.encoder.layers.26.mlp.fc2.bias",
              "model.language_model.layers.27.self_attn.q_proj.bias"):
        assert n in names, n


def test_load_parts_from_hf_and_diffusers_folders(model, tmp_path):
    from umm_ops.model import hf

    hf.save_hf_llm(model.llm, tmp_path / "llm")
    hf.save_hf_siglip(model.vit, tmp_path / "vit")
    model.vae.frozen.save_pretrained(tmp_path / "vae", safe_serialization=True)
    torch.manual_seed(5)
    fresh = CheersModel("tiny")
    ck.load_parts(fresh, llm=tmp_path / "llm", vit=tmp_path / "vit", vae=tmp_path / "vae")
    sa, sb = model.state_dict(), fresh.state_dict()
    for k in sa:
        if k.startswith(("llm.", "vit.", "vae.frozen.")):
            assert torch.equal(sa[k], sb[k]), k
    # the trainable decoder copy restarts from the loaded decoder and statistics
    for k, v in fresh.vae.decoder_copy.decoder.state_dict().items():
        assert torch.equal(v, fresh.vae.frozen.decoder.state_dict()[k]), k
    assert torch.equal(fresh.vae.decoder_copy.bn.running_var, model.vae.frozen.bn.running_var)


def test_load_parts_vae_reads_only_safetensors(model, tmp_path):
    """Issue 20: a diffusers folder with a pickle (.bin) VAE is refused by name before diffusers sees it; a .bin
    beside the safetensors file is never read (garbage there changes nothing)."""
    model.vae.frozen.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert any(p.suffix == ".bin" for p in (tmp_path / "bin").iterdir())
    with pytest.raises(ValueError, match=r"no safetensors weights .*never loaded"):
        ck.load_parts(CheersModel("tiny"), vae=tmp_path / "bin")
    model.vae.frozen.save_pretrained(tmp_path / "both", safe_serialization=True)
    (tmp_path / "both" / "diffusion_pytorch_model.bin").write_bytes(b"garbage, never unpickled")
    fresh = ck.load_parts(CheersModel("tiny"), vae=tmp_path / "both")
    assert torch.equal(fresh.vae.frozen.bn.running_var, model.vae.frozen.bn.running_var)
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        ck.load_parts(CheersModel("tiny"), vae=tmp_path / "both" / "config.json")
