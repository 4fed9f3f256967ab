"""The training policy (umm_ops.train.policy): flow noise and CFG prompt dropout drawn outside the model, per sample
(same draws for a sample in whatever batch it is packed), and CheersModel.forward on them."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_model_open_gates

from umm_ops.data.packing import ROLES, ImageItem, Sample, TextItem, pack
from umm_ops.train import policy
from umm_ops.utils import generator

GEN = ROLES["generate"]


def _img(seed, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def model():
    return tiny_model_open_gates()


# ------------------------------------------------------------------ flow noise
def test_latent_shape_is_what_the_vae_encodes(model):
    for hw in ((32, 32), (64, 32), (96, 64)):
        assert policy.latent_shape(model, hw) == tuple(model.vae.encode(torch.zeros(1, 3, *hw)).shape[1:])
    assert policy.latent_shape(model, (64, 32)) == (8, 128)


def test_flow_noise_is_per_sample_in_any_batch(model):
    """Each generated image gets generator(seed, sample id, index in its document, "flow-noise") noise of its latent
    shape; understanding images None.  Packed with other samples, alone, or in another order: the same tensors."""
    two = Sample([TextItem("paint"), ImageItem(_img(1), "generate"), TextItem("and"),
                  ImageItem(_img(2, 64), "generate")])
    und = Sample([ImageItem(_img(3), "understand"), TextItem("what?"), TextItem("a box", loss=True)])
    mixed = Sample([ImageItem(_img(4), "understand"), TextItem("edit it"), ImageItem(_img(5), "generate")])
    spec = model.pack_spec()
    b = pack([two, und, mixed], spec, sample_ids=[5, 6, 7])[0]
    noise = policy.flow_noise(model, b, seed=123)
    roles = b.image_spans[:, 2].tolist()
    assert [z is None for z in noise] == [r != GEN for r in roles] == [False, False, True, True, False]
    expected = {  # (sample id, index of the image in its document) -> noise
        (5, 0): torch.randn(32 * 32 // 256, 128, generator=generator(123, 5, 0, "flow-noise")),
        (5, 1): torch.randn(64 * 64 // 256, 128, generator=generator(123, 5, 1, "flow-noise")),
        (7, 1): torch.randn(32 * 32 // 256, 128, generator=generator(123, 7, 1, "flow-noise")),
    }
    assert torch.equal(noise[0], expected[5, 0]) and torch.equal(noise[1], expected[5, 1])
    assert torch.equal(noise[4], expected[7, 1]) and noise[0].dtype == torch.float32
    assert not torch.equal(noise[0], noise[4])               # other sample, other noise
    # another batch: other companions, other order, other positions
    b2 = pack([mixed, Sample([TextItem("x"), ImageItem(_img(6), "generate")]), two], spec, sample_ids=[7, 9, 5])[0]
    n2 = policy.flow_noise(model, b2, seed=123)
    assert n2[0] is None and torch.equal(n2[1], expected[7, 1])
    assert torch.equal(n2[3], expected[5, 0]) and torch.equal(n2[4], expected[5, 1])
    # another seed (step): other noise
    assert not torch.equal(policy.flow_noise(model, b, seed=124)[0], noise[0])
    # no image / no generated image
    assert policy.flow_noise(model, pack([und], spec)[0], 0) == [None]
    assert policy.flow_noise(model, pack([Sample([TextItem("t")])], spec)[0], 0) == []
    with pytest.raises(TypeError, match="seed must be an int"):
        policy.flow_noise(model, b, seed=1.5)


def test_packed_batch_equals_each_sample_alone_with_policy_noise(model):
    """flow_noise + forward: a sample's flow velocity, target and loss are the same packed with others or alone (the
    property the model's forward used to give with its own seeded draws)."""
    s0 = Sample([ImageItem(_img(5, 64), "understand"), TextItem("q?"), TextItem("yes", loss=True)])
    s1 = Sample([TextItem("paint"), ImageItem(_img(9, 64), "generate")])
    s2 = Sample([TextItem("just text here"), TextItem(" and more", loss=True)])
    s3 = Sample([TextItem("draw"), ImageItem(_img(8), "generate"), TextItem("then"), ImageItem(_img(7), "generate")])
    samples = [s0, s1, s2, s3]
    spec = model.pack_spec()
    with torch.no_grad():
        b = pack(samples, spec, seed=4, sample_ids=[10, 11, 12, 13])[0]
        packed = model(b, noise=policy.flow_noise(model, b, 11), return_outputs=True)
        # v_pred / v_target are grouped by image size: 64 px (s1), then 32 px (s3's two images)
        b1, b3 = (pack([s], spec, seed=4, sample_ids=[i])[0] for s, i in ((s1, 11), (s3, 13)))
        alone1 = model(b1, noise=policy.flow_noise(model, b1, 11), return_outputs=True)
        alone3 = model(b3, noise=policy.flow_noise(model, b3, 11), return_outputs=True)
    # x1 - noise: the same noise; x1 from a VAE call batched with other images (float32 rounding, ~1e-5)
    torch.testing.assert_close(packed["v_target"][0], alone1["v_target"][0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed["v_target"][1], alone3["v_target"][0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed["v_pred"][0], alone1["v_pred"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed["v_pred"][1], alone3["v_pred"][0], rtol=1e-5, atol=1e-5)
    n1, n3 = alone1["v_target"][0].numel(), alone3["v_target"][0].numel()
    total = (alone1["flow_loss"] * n1 + alone3["flow_loss"] * n3) / (n1 + n3)
    torch.testing.assert_close(packed["flow_loss"], total, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ CFG dropout
def _cfg_samples():
    return [Sample([TextItem("draw a red box"), ImageItem(_img(10), "generate")]),
            Sample([ImageItem(_img(11), "understand"), TextItem("what is it?"), TextItem("a box", loss=True)])]


def test_cfg_dropout_replaces_the_prompt_by_the_null_prompt(model):
    """p = 1: the generation document runs on <|pad|> text (markers kept), the understanding document is untouched,
    and forward on those ids equals forward on the null-prompt batch; p = 0 (or no generated image): the batch's
    own ids, the same tensor."""
    b = pack(_cfg_samples(), model.pack_spec(), seed=1)[0]
    null_ids = model.null_prompt_ids(b.input_ids)
    d1 = int(b.doc_offsets[1])
    ids = policy.cfg_dropout(model, b, 1.0, seed=0)
    assert torch.equal(ids[:d1], null_ids[:d1]) and torch.equal(ids[d1:], b.input_ids[d1:])
    assert not torch.equal(ids[:d1], b.input_ids[:d1])
    assert policy.cfg_dropout(model, b, 0.0, seed=0) is b.input_ids
    und_only = pack(_cfg_samples()[1:], model.pack_spec())[0]
    assert policy.cfg_dropout(model, und_only, 1.0, seed=0) is und_only.input_ids
    noise = policy.flow_noise(model, b, 0)
    with torch.no_grad():
        dropped = model(b, noise=noise, input_ids=ids, return_outputs=True)["hidden"]
        ref_null = model(dataclasses.replace(b, input_ids=null_ids), noise=noise, return_outputs=True)["hidden"]
        ref = model(b, noise=noise, return_outputs=True)["hidden"]
    assert torch.equal(dropped[:d1], ref_null[:d1])
    assert torch.equal(dropped[d1:], ref[d1:])
    assert not torch.equal(ref_null[:d1], ref[:d1])
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 20.0"):
        policy.cfg_dropout(model, b, 20, seed=0)


def test_cfg_dropout_is_per_sample_and_has_rate_p(model):
    """The decision for a document is generator(seed, sample id, "cfg-dropout") < p: the same in whatever batch the
    sample is packed, about a fraction p of the documents, other decisions for another seed."""
    spec = model.pack_spec()
    samples = [Sample([TextItem(f"prompt {i}"), ImageItem(torch.zeros(3, 32, 32), "generate")]) for i in range(300)]
    sids = list(range(1000, 1300))
    b = pack(samples, spec, sample_ids=sids)[0]

    def decisions(batch, seed, p=0.3):
        ids = policy.cfg_dropout(model, batch, p, seed)
        offs = batch.doc_offsets.tolist()
        return {int(s): not torch.equal(ids[offs[d]:offs[d + 1]], batch.input_ids[offs[d]:offs[d + 1]])
                for d, s in enumerate(batch.sample_ids.tolist())}

    got = decisions(b, seed=5)
    for s in sids:
        assert got[s] == (float(torch.rand((), generator=generator(5, s, "cfg-dropout"))) < 0.3)
    assert 60 <= sum(got.values()) <= 120                                 # 300 x 0.3 = 90, sd 8
    sub = pack([samples[i] for i in (7, 3, 250)], spec, sample_ids=[sids[i] for i in (7, 3, 250)])[0]
    assert decisions(sub, seed=5) == {sids[i]: got[sids[i]] for i in (7, 3, 250)}
    assert decisions(b, seed=6) != got


# ------------------------------------------------------------------ the recipe's one call
def test_training_inputs(model):
    b = pack(_cfg_samples(), model.pack_spec(), seed=2, sample_ids=[3, 4])[0]
    inputs = policy.training_inputs(model, b, seed=9, cfg_dropout_p=1.0)
    assert set(inputs) == {"noise", "input_ids"}
    ref_noise = policy.flow_noise(model, b, 9)
    assert all((a is None and c is None) or torch.equal(a, c) for a, c in zip(inputs["noise"], ref_noise))
    assert torch.equal(inputs["input_ids"], policy.cfg_dropout(model, b, 1.0, 9))
    with torch.no_grad():
        a = model(b, **inputs)
        c = model(b, **policy.training_inputs(model, b, seed=9, cfg_dropout_p=1.0))
    assert torch.equal(a["loss"], c["loss"]) and torch.isfinite(a["loss"])
    assert policy.training_inputs(model, b, seed=9, cfg_dropout_p=0.0)["input_ids"] is b.input_ids
