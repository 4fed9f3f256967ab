"""Tokenizers (umm_ops.data.tokenizer): the byte tokenizer's id layout and round trip, the Hugging Face wrapper on a
tokenizer folder built here (no hub), load_tokenizer, the Qwen chat template, errors."""
from __future__ import annotations

import random
import re
import warnings

import pytest
import torch

from umm_ops.data.tokenizer import (SPECIAL_TOKENS, ByteTokenizer, HFTokenizer, chat_template, load_tokenizer)

ALPHABET = "abc xyz\n\t.,!?<>|_" + "éß漢字😀" + "\x00\x7f"


def random_text(rng: random.Random, n: int, specials: bool = True) -> str:
    parts = []
    for _ in range(n):
        r = rng.random()
        if specials and r < 0.15:
            parts.append(rng.choice(SPECIAL_TOKENS))
        elif r < 0.2:
            parts.append(rng.choice(["<|", "|>", "<|im_", "end|>", "<image>"]))  # near-misses stay plain text
        else:
            parts.append(rng.choice(ALPHABET))
    return "".join(parts)


def test_byte_ids_layout():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256 + 7
    assert [tok.special(s) for s in SPECIAL_TOKENS] == list(range(256, 263))
    assert SPECIAL_TOKENS == ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                              "<|image_pad|>", "<|pad|>")
    assert tok.eos_id == tok.special("<|im_end|>") == 258
    assert tok.pad_id == tok.special("<|pad|>") == 262
    assert tok.encode("hé") == [104, 0xC3, 0xA9]
    assert tok.encode("a<|im_end|>b") == [97, 258, 98]
    assert tok.encode("<|im_end") == list(b"<|im_end")
    assert tok.encode("") == []


def test_byte_round_trip(seed):
    rng = random.Random(seed)
    tok = ByteTokenizer()
    for _ in range(50):
        s = random_text(rng, rng.randrange(0, 40))
        ids = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s
        assert tok.decode(torch.tensor(ids, dtype=torch.int64)) == s
        # skipping specials drops them; what remains is the plain text (specials never split a character here).
        # One left-to-right pass, as the encoder scans: removing the specials one kind after another could join the
        # pieces around a removed "<|pad|>" into a new "<|im_end|>" that the encoder saw as plain bytes (a CI seed).
        plain = re.sub("|".join(map(re.escape, SPECIAL_TOKENS)), "", s)
        assert tok.decode(ids, skip_special=True) == plain


def test_byte_errors():
    tok = ByteTokenizer()
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match=r"ids\[1\] = 263 is outside the vocabulary \[0, 263\)"):
        tok.decode([1, 263])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(TypeError, match=r"ids\[0\] must be an int, got float"):
        tok.decode([1.0])
    with pytest.raises(TypeError, match="1-D integer tensor"):
        tok.decode(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(KeyError, match="unknown special token '<\\|foo\\|>'"):
        tok.special("<|foo|>")


# ------------------------------------------------------------------------------------------ Hugging Face tokenizers
def _bpe_folder(path, specials, pad_token=None):
    """A small byte-level BPE tokenizer (the kind Qwen2 uses) trained here and saved in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(specials), show_progress=False)
    core.train_from_iterator(["a red circle left of a blue square", "how many shapes? three"] * 10, trainer)
    kw = {"pad_token": pad_token} if pad_token else {}
    PreTrainedTokenizerFast(tokenizer_object=core, **kw).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def partial_folder(tmp_path_factory):
    """Has <|endoftext|>, <|im_start|>, <|im_end|> (pad = <|endoftext|>) but not the vision tokens."""
    return _bpe_folder(tmp_path_factory.mktemp("tok_partial"), SPECIAL_TOKENS[:3], pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def qwen_like_folder(tmp_path_factory):
    """Has every special but <|pad|> and uses <|endoftext|> as its pad token, like Qwen2.5's tokenizer."""
    return _bpe_folder(tmp_path_factory.mktemp("tok_qwen"), SPECIAL_TOKENS[:6], pad_token="<|endoftext|>")


def test_hf_adds_missing_specials(partial_folder):
    with pytest.warns(UserWarning, match=r"lacked the special tokens \['<\|vision_start\|>', '<\|vision_end\|>', "
                                         r"'<\|image_pad\|>'\]"):
        tok = HFTokenizer(partial_folder)
    ids = [tok.special(s) for s in SPECIAL_TOKENS]
    assert len(set(ids[:6])) == 6 and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.pad_id == tok.special("<|pad|>") == tok.special("<|endoftext|>")  # its own pad token
    assert tok.eos_id == tok.special("<|im_end|>")
    text = "<|im_start|>user\na red <|vision_start|><|image_pad|><|vision_end|> square?<|im_end|>"
    ids = tok.encode(text)
    for s in SPECIAL_TOKENS[:6]:
        assert ids.count(tok.special(s)) == text.count(s)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == "user\na red  square?"


def test_hf_complete_tokenizer_no_warning(qwen_like_folder, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok = HFTokenizer(qwen_like_folder)
    assert tok.vocab_size == len(tok.tokenizer)
    rng = random.Random(seed)
    for _ in range(20):  # byte-level BPE is lossless on any text
        s = random_text(rng, rng.randrange(1, 30))
        s = s.replace("<|pad|>", "")  # not a token of this tokenizer: it would stay plain text, which is fine too
        assert tok.decode(tok.encode(s)) == s


def test_load_tokenizer(partial_folder, tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.warns(UserWarning):
        assert isinstance(load_tokenizer(partial_folder), HFTokenizer)
    with pytest.raises(ValueError, match="expected 'byte', 'world' or an existing folder.*'no/such/dir'"):
        load_tokenizer("no/such/dir")
    with pytest.raises(TypeError, match="expected 'byte', 'world' or a tokenizer folder path, got int"):
        load_tokenizer(3)
    with pytest.raises(ValueError, match="could not load a tokenizer from"):
        HFTokenizer(tmp_path)  # an empty folder
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        HFTokenizer(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ chat template
def test_chat_template():
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": ["What is ", torch.zeros(3, 4, 4), " and ", {"type": "image"},
                                         {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "Two squares."}]
    assert chat_template(msgs) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                   "<|im_start|>user\nWhat is <image> and <image>?<|im_end|>\n"
                                   "<|im_start|>assistant\nTwo squares.<|im_end|>\n")
    assert chat_template(msgs[:2], add_generation_prompt=True).endswith("?<|im_end|>\n<|im_start|>assistant\n")
    assert chat_template([]) == ""
    tok = ByteTokenizer()
    ids = tok.encode(chat_template(msgs))
    assert ids.count(tok.special("<|im_start|>")) == 3 and ids.count(tok.eos_id) == 3


def test_chat_template_errors():
    with pytest.raises(ValueError, match="message 0 must be a dict with 'role' and 'content'"):
        chat_template([{"role": "user"}])
    with pytest.raises(TypeError, match="message 0 content part 1 must be a str"):
        chat_template([{"role": "user", "content": ["a", 3]}])
    with pytest.raises(TypeError, match="messages must be a list"):
        chat_template("hello")
    with pytest.raises(ValueError, match="role must be a non-empty str"):
        chat_template([{"role": "", "content": "x"}])


def test_hf_tokenizer_packs_and_round_trips(qwen_like_folder, seed):
    """The packer runs on an HF tokenizer as on the byte one: special ids from it, text back through unpack."""
    from umm_ops.data.packing import ImageItem, PackSpec, Sample, TextItem, pack, unpack

    tok = HFTokenizer(qwen_like_folder)
    spec = PackSpec(tok, patch=8, budget=4096, align=16)
    rng = random.Random(seed)
    samples = [Sample([TextItem("<|im_start|>user\n" + random_text(rng, 12, specials=False)),
                       ImageItem(torch.rand(3, 16, 8) * 2 - 1),
                       TextItem(random_text(rng, 10, specials=False) + "<|im_end|>", loss=True)]) for _ in range(3)]
    b, = pack(samples, spec)
    assert unpack(b, tok) == samples
    start, n, _ = b.image_spans[0].tolist()
    assert n == 2 and start % 16 == 0
    assert b.input_ids[start - 1].item() == tok.special("<|vision_start|>")
    assert (b.input_ids[start:start + n] == tok.special("<|image_pad|>")).all()
    assert b.input_ids[b.input_ids == tok.pad_id].numel() > 0  # alignment pads use the tokenizer's pad token


# ----------------------------------------------------------------------------------------------- world tokenizer
def test_world_tokenizer_shipped_is_what_the_command_builds(tmp_path):
    """The shipped BPE is reproducible: rebuilding it gives the same tokenizer.json byte for byte."""
    import json

    from umm_ops.cli import main
    from umm_ops.data.world_tokenizer import SHIPPED_TOKENIZER

    assert main(["build-tokenizer", "--out", str(tmp_path / "tok")]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (SHIPPED_TOKENIZER / "tokenizer.json").read_bytes()
    info = json.loads((SHIPPED_TOKENIZER / "build_info.json").read_text())
    assert info["command"] == "umm build-tokenizer" and info["vocab_size"] == 512


def test_world_tokenizer_words_round_trip_and_specials():
    from umm_ops.data.synthetic import SyntheticWorld, format_question

    tok = load_tokenizer("world")
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 512 and load_tokenizer("world") is tok
    assert [tok.special(s) for s in SPECIAL_TOKENS] == list(range(7))
    # held-out scenes (a seed the corpus did not use) at a size it did not use: about one token per word, each
    # answer one token, lossless
    w = SyntheticWorld(size=96, seed=7, max_objects=4, length=40)
    chars = toks = 0
    for i in range(40):
        r = w[i]
        for text in [r.caption, r.prompt["text"]] + [format_question(q) for q in r.vqa]:
            ids = tok.encode(text)
            assert tok.decode(ids) == text
            chars, toks = chars + len(text), toks + len(ids)
        for q in r.vqa:
            assert len(tok.encode(q["answer_letter"])) == 1 and len(tok.encode(" " + q["answer"])) <= 2, q
    assert chars / toks > 3.5, (chars, toks)
    # any other text still encodes (bytes at worst) and specials inside text become their ids
    s = "Zebra • ünïcode <|im_end|>\nx"
    ids = tok.encode(s)
    assert tok.decode(ids) == s and tok.eos_id in ids


def test_tiny_preset_uses_the_world_tokenizer():
    from umm_ops.model.config import preset

    c = preset("tiny")
    assert c.tokenizer == "world" and c.llm["vocab_size"] == load_tokenizer("world").vocab_size
