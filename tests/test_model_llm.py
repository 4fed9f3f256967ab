"""The Qwen2 LLM on span attention (umm_ops.model.llm / hf / sampling): parity with transformers' Qwen2ForCausalLM
loaded from folders the test writes (single-file and sharded safetensors, tied and untied embeddings), packed-batch
and mask behaviour at model level, the KV cache against full recomputation, generation, gradients and errors.

Tolerances: float64 runs compare the same formulas evaluated in float64 by two implementations (transformers'
eager/SDPA attention vs our span attention on the float64 reference): they differ by rounding only, bounded by
1e-10 of the logit scale (~ 1e5 ulps of float64 headroom over a few-thousand-operation chain, and ~1e6 times
smaller than any real mistake, which moves logits by O(1e-2) or more).  float32 runs use the project's rule
(tests/tolerance.py): our float32 error against the float64 result is at most 2x transformers' own float32 error
plus a 32-ulp floor.
"""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

import umm_ops
from umm_ops import SpanLayout
from umm_ops.model.hf import load_llm, save_hf_llm
from umm_ops.model.llm import KVCache, Qwen2Config, Qwen2LM, positions_in_document
from umm_ops.model.sampling import Generation, generate, sample_next, stop_index
from tolerance import assert_close_rule

transformers = pytest.importorskip("transformers")

VOCAB = 89


def hf_model(tie: bool, n_heads=4, n_kv=2, layers=2, hidden=48, head_dim=None):
    kw = {} if head_dim is None else {"head_dim": head_dim}
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=80,
                                   num_hidden_layers=layers, num_attention_heads=n_heads, num_key_value_heads=n_kv,
                                   tie_word_embeddings=tie, rope_parameters={"rope_type": "default",
                                                                             "rope_theta": 1e6}, **kw)
    m = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers initialises biases and norms to 0 / 1: make every parameter matter
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return m


def tiny_config(**kw) -> Qwen2Config:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=1e4, tie_word_embeddings=True)
    base.update(kw)
    return Qwen2Config(**base)


def tiny_model(dtype=torch.float32, **kw) -> Qwen2LM:
    m = Qwen2LM(tiny_config(**kw)).to(dtype).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return m


def close64(a, b, name="logits"):
    scale = max(1.0, b.abs().max().item())
    err = (a.double() - b.double()).abs().max().item()
    assert err <= 1e-10 * scale, f"{name}: float64 error {err:.3e} > {1e-10 * scale:.3e}"


# ------------------------------------------------------------------------------------------ parity with transformers
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_logits_match_transformers(tmp_path, tie, sharded, seed):
    ref = hf_model(tie, head_dim=16 if sharded else None)  # head_dim given explicitly (!= hidden / heads) once
    ref.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "5GB")
    names = os.listdir(tmp_path)
    assert ("model.safetensors.index.json" in names) == sharded
    ids = torch.randint(0, VOCAB, (3, 13))

    m32 = load_llm(tmp_path)
    assert (m32.lm_head.weight is m32.model.embed_tokens.weight) == tie
    m64 = load_llm(tmp_path, dtype=torch.float64)
    with torch.no_grad():
        ours32, ours64 = m32(ids), m64(ids)
        hf32 = ref(ids).logits
        hf64 = ref.to(torch.float64)(ids).logits
    assert ours32.shape == (3, 13, VOCAB) and ours32.dtype == torch.float32
    close64(ours64, hf64)
    assert_close_rule(ours32, hf64, hf32, torch.float32, "float32 logits")
    if not sharded:  # bfloat16 (span attention's CPU kernel in bf16), against float64 on the same rounded weights
        m16 = load_llm(tmp_path, dtype=torch.bfloat16)
        with torch.no_grad():
            ours16, hf16 = m16(ids), ref.to(torch.bfloat16)(ids).logits
            hf64r = ref.to(torch.float64)(ids).logits
        assert_close_rule(ours16, hf64r, hf16, torch.bfloat16, "bfloat16 logits")


def test_saved_folder_loads_in_transformers_and_round_trips(tmp_path, seed):
    m = tiny_model(tie_word_embeddings=False)
    save_hf_llm(m, tmp_path / "single")
    save_hf_llm(m, tmp_path / "sharded", max_shard_size=20_000)
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    ids = torch.randint(0, VOCAB, (2, 9))
    for sub in ("single", "sharded"):
        back = load_llm(tmp_path / sub)
        for (n1, a), (n2, b) in zip(m.state_dict().items(), back.state_dict().items()):
            assert n1 == n2 and torch.equal(a, b), n1
        hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / sub).eval()
        with torch.no_grad():
            hf64 = hf.to(torch.float64)(ids).logits
            ours64 = m.to(torch.float64)(ids)
            m.float()
        close64(ours64, hf64)
    # re-saving as one file removes the old shards (no stale index left to confuse a loader)
    save_hf_llm(m, tmp_path / "sharded")
    assert sorted(os.listdir(tmp_path / "sharded")) == ["config.json", "model.safetensors"]


def test_config_round_trip_and_hf_variants():
    c = tiny_config(head_dim=16, eos_token_id=[3, 4])
    assert Qwen2Config.from_hf(c.to_hf()) == c
    old_style = {k: v for k, v in c.to_hf().items() if k != "rope_parameters"}   # transformers 4.x config.json
    assert Qwen2Config.from_hf(old_style) == c
    hf = transformers.Qwen2Config(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1)
    got = Qwen2Config.from_hf(hf.to_dict())
    assert (got.rope_theta, got.tie_word_embeddings, got.dim_head) == (hf.rope_parameters["rope_theta"], False, 4)


def test_embedding_multiplier(seed):
    """embedding_multiplier m (not in transformers' Qwen2): the first layer reads m x the token embeddings, and the
    tied lm_head is unchanged, so the logits are exactly those of a model whose embeddings feed m x E to the layers:
    checked against the same model run on m x E given as inputs_embeds.  1.0 is Qwen2 to the bit; the config round-
    trips through its dict form, is refused in a transformers config.json, and must be a finite positive number."""
    c = tiny_config()
    plain = Qwen2LM(c).double()
    scaled = Qwen2LM(c.replace(embedding_multiplier=50.0)).double()
    scaled.load_state_dict(plain.state_dict())
    ids = torch.randint(0, c.vocab_size, (2, 7))
    L = ids.shape[1]
    layout = SpanLayout.from_segments([[(L, "causal")]] * 2)
    pos = torch.arange(L).repeat(2)
    with torch.no_grad():
        assert torch.equal(scaled.embed(ids), 50.0 * plain.model.embed_tokens(ids))
        want = plain.logits(plain.forward_packed(50.0 * plain.model.embed_tokens(ids.reshape(-1)), pos, layout))
        torch.testing.assert_close(scaled(ids).reshape(-1, c.vocab_size), want, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(scaled(ids), plain(ids))
        assert plain.config.embedding_multiplier == 1.0
        assert torch.equal(plain.embed(ids), plain.model.embed_tokens(ids))
    d = {**plain.config.to_hf(), "embedding_multiplier": 50.0}
    assert Qwen2Config.from_hf(d) == scaled.config
    with pytest.raises(ValueError, match="embedding_multiplier = 50.0 has no counterpart in transformers"):
        scaled.config.to_hf()
    for bad in (0.0, -1.0, float("inf"), float("nan"), "50", True):
        with pytest.raises(ValueError, match="embedding_multiplier must be a finite positive number"):
            c.replace(embedding_multiplier=bad)


# ------------------------------------------------------------------------------------------ packed batches and masks
def _docs_alone(model, docs):
    with torch.no_grad():
        return torch.cat([model(d[None])[0] for d in docs])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_batch_equals_each_document_alone(dtype, seed):
    m64 = tiny_model(torch.float64)
    m = m64 if dtype == torch.float64 else Qwen2LM(m64.config).eval()
    if dtype == torch.float32:
        m.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    lens = [7, 1, 12, 4]
    docs = [torch.randint(0, VOCAB, (n,)) for n in lens]
    layout = SpanLayout.from_segments([[(n, "causal")] for n in lens])
    pos = positions_in_document(layout)
    assert pos.tolist() == [i for n in lens for i in range(n)]
    with torch.no_grad():
        packed = m.logits(m.forward_packed(m.embed(torch.cat(docs)), pos, layout))
    ref64 = _docs_alone(m64, docs)
    if dtype == torch.float64:
        close64(packed, ref64)
    else:
        assert_close_rule(packed, ref64, _docs_alone(m, docs), torch.float32, "packed float32 logits")


def test_later_tokens_never_change_earlier_logits(seed):
    m = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 15))
    with torch.no_grad():
        base = m(ids)
        for t in (1, 7, 14):
            ids2 = ids.clone()
            ids2[:, t] = (ids2[:, t] + 1 + torch.randint(0, VOCAB - 1, (2,))) % VOCAB
            out = m(ids2)
            assert torch.equal(out[:, :t], base[:, :t]), f"token {t} changed earlier logits"
            assert not torch.allclose(out[:, t:], base[:, t:])


def _hidden(m, x, layout):
    return m.forward_packed(x, positions_in_document(layout), layout)


def test_full_block_sees_itself_and_noise_block_is_invisible(seed):
    m = tiny_model()
    D = m.config.hidden_size
    # doc: text 4, image block 6 (full), text 3, noisy latents 5 (noise), text 2
    segs = [(4, "causal"), (6, "full"), (3, "causal"), (5, "noise"), (2, "causal")]
    layout = SpanLayout.from_segments([segs])
    x = torch.randn(20, D)
    with torch.no_grad():
        h = _hidden(m, x, layout)
        # the last token of the full block changes its first token (bidirectional), never the text before it
        x2 = x.clone()
        x2[9] += 1.0
        h2 = _hidden(m, x2, layout)
        assert torch.equal(h2[:4], h[:4])
        assert not torch.allclose(h2[4], h[4])
        # the noise block: invisible to every later token and to earlier ones; its own tokens see each other
        x3 = x.clone()
        x3[13:18] = torch.randn(5, D)
        h3 = _hidden(m, x3, layout)
        assert torch.equal(h3[:13], h[:13]) and torch.equal(h3[18:], h[18:])
        assert not torch.allclose(h3[13:18], h[13:18])
        x4 = x.clone()
        x4[17] += 1.0
        assert not torch.allclose(_hidden(m, x4, layout)[13], h[13])
        # a causal layout over the same tokens differs (the block really is bidirectional)
        causal = SpanLayout.from_segments([[(20, "causal")]])
        assert not torch.allclose(_hidden(m, x, causal)[4:10], h[4:10])


# ------------------------------------------------------------------------------------------ KV cache
def _full_recompute(m, x_docs, segs_docs):
    layout = SpanLayout.from_segments(segs_docs)
    return m.forward_packed(torch.cat(x_docs), positions_in_document(layout), layout), layout


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kv_cache_steps_equal_full_recompute(dtype, seed):
    m = tiny_model(dtype)
    D = m.config.hidden_size
    # steps: (new segments per document); documents may add nothing in a step
    steps = [
        [[(5, "causal")], [(3, "causal"), (4, "full")], [(1, "causal")]],
        [[(1, "causal")], [(1, "causal")], [(1, "causal")]],
        [[(6, "full")], [], [(2, "causal"), (3, "noise")]],
        [[(2, "causal")], [(1, "causal")], []],
        [[(1, "causal")], [(4, "noise")], [(1, "causal")]],
    ]
    cache = m.new_cache()
    xs = [[] for _ in range(3)]
    segs = [[] for _ in range(3)]
    with torch.no_grad():
        for new in steps:
            layout = cache.layout_for(new)
            new_x = [torch.randn(sum(n for n, _ in s), D, dtype=dtype) for s in new]
            out = m.forward_packed(torch.cat(new_x), cache.positions_for(layout), layout, cache)
            for d in range(3):
                xs[d].append(new_x[d])
                segs[d] += new[d]
            full, _ = _full_recompute(m, [torch.cat(x) for x in xs], segs)
            # the rows of the new tokens, in the full recompute
            lens = [sum(n for n, _ in s) for s in segs]
            news = [sum(n for n, _ in s) for s in new]
            starts = torch.tensor([0] + lens).cumsum(0)
            rows = torch.cat([torch.arange(starts[d + 1] - news[d], starts[d + 1]) for d in range(3)])
            if dtype == torch.float64:
                close64(out, full[rows], "cached step")
            else:
                m64 = Qwen2LM(m.config).double().eval()
                m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
                full64, _ = _full_recompute(m64, [torch.cat(x).double() for x in xs], segs)
                assert_close_rule(out, full64[rows], full[rows], torch.float32, "cached step float32")
            assert cache.lengths() == lens and len(cache) == sum(lens)


def test_kv_cache_read_only_step_select_and_errors(seed):
    m = tiny_model(torch.float64)
    D = m.config.hidden_size
    cache = m.new_cache()
    with torch.no_grad():
        layout = cache.layout_for([[(4, "causal")], [(6, "causal")]])
        m.forward_packed(torch.randn(10, D, dtype=torch.float64), positions_in_document(layout), layout, cache)
        # Cheers' image steps: the prompt cached, the image block recomputed against it without being appended
        img = cache.layout_for([[(3, "full")], [(3, "full")]])
        x = torch.randn(6, D, dtype=torch.float64)
        a = m.forward_packed(x, positions_in_document(img), img, cache, update_cache=False)
        assert cache.lengths() == [4, 6]
        b = m.forward_packed(x, positions_in_document(img), img, cache.clone())
        close64(a, b, "read-only step")
        # select keeps documents (in the given order) and their keys
        c2 = cache.clone().select([1])
        one = c2.layout_for([[(3, "full")]])
        c = m.forward_packed(x[3:], positions_in_document(one), one, c2)
        close64(c, a[3:], "selected document")
        # mismatched layouts raise with what was expected
        with pytest.raises(ValueError, match="cached tokens"):
            bad = SpanLayout.from_segments([[(5, "causal")], [(7, "causal")]], q_lens=[2, 2])
            m.forward_packed(torch.randn(4, D, dtype=torch.float64), torch.arange(4), bad, cache)
        with pytest.raises(ValueError, match="cached lengths"):
            bad = SpanLayout.from_segments([[(6, "causal")], [(7, "causal")]], q_lens=[1, 2])
            m.forward_packed(torch.randn(3, D, dtype=torch.float64), torch.arange(3), bad, cache)
        with pytest.raises(ValueError, match="documents"):
            bad = SpanLayout.from_segments([[(11, "causal")]], q_lens=[1])
            m.forward_packed(torch.randn(1, D, dtype=torch.float64), torch.arange(1), bad, cache)
        with pytest.raises(ValueError, match="needs the KVCache"):
            m.forward_packed(torch.randn(1, D, dtype=torch.float64), torch.arange(1), bad)
        with pytest.raises(ValueError, match="first step on an empty cache"):
            m.forward_packed(torch.randn(1, D, dtype=torch.float64), torch.arange(1), bad, m.new_cache())
        with pytest.raises(IndexError, match="document indices"):
            cache.clone().select([2])


# ------------------------------------------------------------------------------------------ generation
def _greedy_no_cache(m, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_batched_greedy_generation_equals_one_by_one_and_no_cache(seed):
    m = tiny_model(torch.float64)   # float64: no near-ties between logits that rounding could flip
    prompts = [[random.randrange(VOCAB) for _ in range(n)] for n in (3, 9, 1, 5)]
    batched = generate(m, prompts, max_new_tokens=8)
    assert all(isinstance(g, Generation) and g.finish_reason == "length" and len(g.tokens) == 8 for g in batched)
    for p, g in zip(prompts, batched):
        assert generate(m, [p], max_new_tokens=8)[0].tokens == g.tokens
        assert _greedy_no_cache(m, p, 8) == g.tokens
    # (B, L) tensors give the same as lists
    t = torch.tensor([prompts[1], prompts[1]])
    assert [g.tokens for g in generate(m, t, 8)] == [batched[1].tokens] * 2


def test_generation_stops_and_is_reproducible_with_a_seed(seed):
    m = tiny_model(torch.float64)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    greedy = generate(m, prompts, max_new_tokens=10)
    # stop on a greedy token of prompt 0: each sequence ends before its first occurrence (not included)
    stop_tok = greedy[0].tokens[2]
    g = generate(m, prompts, max_new_tokens=10, stop=stop_tok)
    assert g[0].tokens == greedy[0].tokens[:greedy[0].tokens.index(stop_tok)] and g[0].finish_reason == "stop"
    cut = greedy[1].tokens.index(stop_tok) if stop_tok in greedy[1].tokens else 10
    assert g[1].tokens == greedy[1].tokens[:cut]
    # stop strings through a tokenizer (one character per token id)

    class CharTok:
        def encode(self, s):
            return [ord(c) - 32 for c in s]

        def decode(self, ids):
            return "".join(chr(i + 32) for i in ids)

    tok = CharTok()
    text0 = tok.decode(greedy[0].tokens)
    s = text0[3:5]
    g = generate(m, prompts, max_new_tokens=10, stop=[s], tokenizer=tok)
    assert g[0].finish_reason == "stop" and g[0].text == text0[:text0.find(s)]
    assert stop_index("abcXYdef", ["de", "XY"]) == 3 and stop_index("abc", ["z"]) == -1
    texts = generate(m, [tok.decode(p) for p in prompts], max_new_tokens=4, tokenizer=tok)
    assert [t.tokens for t in texts] == [x.tokens[:4] for x in greedy]
    # sampling: same seed, same output; another seed differs somewhere
    kw = dict(max_new_tokens=12, temperature=1.5, top_k=20, top_p=0.95)
    a, b = generate(m, prompts, seed=1234, **kw), generate(m, prompts, seed=1234, **kw)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    others = [generate(m, prompts, seed=s, **kw) for s in (1, 2)]
    assert any([x.tokens for x in o] != [x.tokens for x in a] for o in others)
    assert generate(m, prompts, max_new_tokens=0)[0].tokens == []


def test_sample_next(seed):
    logits = torch.randn(6, 50)
    top = logits.argmax(-1)
    g = torch.Generator().manual_seed(seed)
    assert torch.equal(sample_next(logits), top)
    assert torch.equal(sample_next(logits, temperature=5.0, top_k=1, generator=g), top)
    assert torch.equal(sample_next(logits, temperature=5.0, top_p=1e-6, generator=g), top)
    # top-k: only the k best ever come out; top-p: only the nucleus
    top3 = logits.topk(3, -1).indices
    draws = torch.stack([sample_next(logits, 10.0, top_k=3, generator=g) for _ in range(200)], 1)
    assert (draws[:, :, None] == top3[:, None, :]).any(-1).all()
    p = torch.softmax(logits, -1)
    sp, order = p.sort(-1, descending=True)
    nucleus = [set(order[r, : int((sp[r].cumsum(0) < 0.7).sum()) + 1].tolist()) for r in range(6)]
    draws = torch.stack([sample_next(logits, 1.0, top_p=0.7, generator=g) for _ in range(200)], 1)
    assert all(set(draws[r].tolist()) <= nucleus[r] for r in range(6))
    assert all(len(set(draws[r].tolist())) == len(nucleus[r]) for r in range(6) if len(nucleus[r]) <= 3)
    # temperature sampling follows softmax(logits / T): frequencies of a 3-way distribution
    lg = torch.tensor([[0.0, 1.0, 2.0]]).repeat(4000, 1)
    freq = torch.bincount(sample_next(lg, 2.0, generator=g), minlength=3).double() / 4000
    expect = torch.softmax(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), 0)
    assert (freq - expect).abs().max() < 0.04    # > 5 standard deviations of a 4000-draw frequency
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            sample_next(logits, **({"temperature": 1.0} | bad))
    with pytest.raises(ValueError, match="logits must be"):
        sample_next(torch.randn(5))


# ------------------------------------------------------------------------------------------ gradients and errors
def test_gradients_reach_every_parameter(seed):
    for tie in (True, False):
        m = tiny_model(tie_word_embeddings=tie).train()
        layout = SpanLayout.from_segments([[(3, "causal"), (4, "full"), (2, "causal")], [(5, "causal")]])
        ids = torch.randint(0, VOCAB, (14,))
        h = m.forward_packed(m.embed(ids), positions_in_document(layout), layout)
        loss = torch.nn.functional.cross_entropy(m.logits(h[:-1]), ids[1:])
        loss.backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
        m.gradient_checkpointing = True
        m.zero_grad()
        h2 = m.forward_packed(m.embed(ids), positions_in_document(layout), layout)
        torch.nn.functional.cross_entropy(m.logits(h2[:-1]), ids[1:]).backward()
        assert all(p.grad is not None for p in m.parameters())


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        tiny_config(num_key_value_heads=3)
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        tiny_config(hidden_size=30)
    with pytest.raises(ValueError, match="even"):
        tiny_config(head_dim=7)
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        tiny_config(vocab_size=0)
    hf = tiny_config().to_hf()
    with pytest.raises(NotImplementedError, match="sliding"):
        Qwen2Config.from_hf(hf | {"use_sliding_window": True})
    with pytest.raises(NotImplementedError, match="RoPE"):
        Qwen2Config.from_hf(hf | {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}})
    with pytest.raises(ValueError, match="model_type"):
        Qwen2Config.from_hf(hf | {"model_type": "llama"})
    with pytest.raises(ValueError, match="missing"):
        Qwen2Config.from_hf({"model_type": "qwen2", "vocab_size": 3})


def test_bad_folders_raise_naming_the_keys(tmp_path, seed):
    from safetensors.torch import load_file, save_file

    m = tiny_model(tie_word_embeddings=False)
    save_hf_llm(m, tmp_path / "ok")
    sd = load_file(tmp_path / "ok" / "model.safetensors")
    cfg = (tmp_path / "ok" / "config.json").read_text()

    def folder(name, tensors, config=cfg):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(config)
        save_file(tensors, d / "model.safetensors")
        return d

    drop = {k: v for k, v in sd.items() if k not in ("model.layers.1.mlp.up_proj.weight", "lm_head.weight")}
    with pytest.raises(ValueError, match=r"2 weights missing.*lm_head\.weight.*model\.layers\.1\.mlp\.up_proj"):
        load_llm(folder("missing", drop))
    extra = dict(sd) | {"model.layers.9.mlp.up_proj.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"unknown tensors.*model\.layers\.9\.mlp\.up_proj\.weight"):
        load_llm(folder("extra", extra))
    load_llm(tmp_path / "extra", strict=False)
    wrong = dict(sd) | {"model.norm.weight": torch.ones(7)}
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*shape \(7,\)"):
        load_llm(folder("shape", wrong))
    pk = tmp_path / "pickle"
    pk.mkdir()
    (pk / "config.json").write_text(cfg)
    (pk / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle checkpoints are never loaded"):
        load_llm(pk)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llm(tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        load_llm(folder("llama", sd, json.dumps(json.loads(cfg) | {"model_type": "llama"})))


def test_forward_input_errors():
    m = tiny_model()
    layout = SpanLayout.from_segments([[(4, "causal")]])
    with pytest.raises(ValueError, match=r"inputs_embeds must be a \(L, 32\)"):
        m.forward_packed(torch.randn(4, 31), torch.arange(4), layout)
    with pytest.raises(ValueError, match="position_ids must be an integer tensor of shape"):
        m.forward_packed(torch.randn(4, 32), torch.arange(4.0), layout)
    with pytest.raises(ValueError, match="4 queries"):
        m.forward_packed(torch.randn(5, 32), torch.arange(5), layout)
    with pytest.raises(TypeError, match="SpanLayout"):
        m.forward_packed(torch.randn(4, 32), torch.arange(4), [[(4, "causal")]])
    with pytest.raises(ValueError, match=r"input_ids must be a \(B, L\)"):
        m(torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="KVCache"):
        m.forward_packed(torch.randn(4, 32), torch.arange(4), layout, cache={})
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(m, [[]], 3)
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(m, [[1]], 3, stop="x")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, [[1]], -1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_logits_and_cache_match(tmp_path, dtype, seed):
    ref = hf_model(True, hidden=64)                    # head dim 16
    ref.save_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (3, 13))
    with torch.no_grad():
        hf64 = ref.double()(ids).logits
        hf_low = ref.to(dtype).cuda()(ids.cuda()).logits.cpu()
        m = load_llm(tmp_path, dtype=dtype, device="cuda")
        ours = m(ids.cuda()).cpu()
        assert_close_rule(ours, hf64, hf_low, dtype, f"cuda {dtype} logits")
        # the last token through the cache equals the full forward's last row
        cache = m.new_cache()
        flat = ids.cuda()
        lay = cache.layout_for([[(12, "causal")]] * 3, device="cuda")
        m.forward_packed(m.embed(flat[:, :12].reshape(-1)), positions_in_document(lay), lay, cache)
        lay = cache.layout_for([[(1, "causal")]] * 3)
        last = m.logits(m.forward_packed(m.embed(flat[:, 12]), positions_in_document(lay), lay, cache)).cpu()
        assert_close_rule(last, hf64[:, -1], hf_low[:, -1], dtype, f"cuda {dtype} cached step")
