"""The synthetic world's tokenizer: a byte-level BPE (Hugging Face ``tokenizers``) trained on the world's own text.

    umm build-tokenizer --out umm_ops/assets/world-tokenizer     # what ships in the package (the tiny preset's)
    load_tokenizer("world")                                      # the shipped one (umm_ops.data.tokenizer)

Why: the tiny preset learns the world on two CPU cores in minutes, and the byte tokenizer spends ~110 tokens on a
multiple-choice question ("What color is the star?\\nA. red\\n..." one token per character), so most of the LLM's
work went into spelling.  Trained on captions, questions (multiple choice and short answer), generation prompts and
instructions of every scene type, this BPE gives about one token per word, and every answer word (a colour, shape,
count, direction, option letter) is one token.  It is byte-level (GPT-2 / Qwen style): any other text still
encodes, byte by byte at worst, and ``decode(encode(s)) == s``.

Special tokens: ``SPECIAL_TOKENS`` of umm_ops.data.tokenizer (ids 0..6), then the 256 byte symbols, then the merges.
The build is deterministic (a fixed corpus; the trainer breaks ties by its own order), and the shipped files record
the command that made them (``build_info.json``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..utils import ASSETS, optional_import

__all__ = ["world_corpus", "build_world_tokenizer", "SHIPPED_TOKENIZER", "WORLD_VOCAB_SIZE"]

SHIPPED_TOKENIZER = ASSETS / "world-tokenizer"
WORLD_VOCAB_SIZE = 512   # 7 specials + 256 bytes + 249 merges: every word of the world is one token with room to spare


def world_corpus(records: int = 2000, seed: int = 12345) -> list:
    """Texts of the synthetic world: for `records` scenes at 64 and 128 px (all shapes, colours, up to 8 objects,
    plain and two-tone backgrounds) their caption, every question in both formats with its answers, every
    generation prompt, plus the fixed instructions.  A seed of its own (not a training seed)."""
    from .synthetic import MC_SUFFIX, SA_SUFFIX, SEGMENT_PROMPT, SyntheticWorld, format_question

    texts = ["Describe the image.", SEGMENT_PROMPT, MC_SUFFIX, SA_SUFFIX, "user\n", "assistant\n", "system\n",
             "You are a helpful assistant.", "ABCD", "0123456789"]
    per = max(1, records // 4)
    for size, max_objects in ((64, 3), (64, 8), (128, 4), (128, 8)):
        world = SyntheticWorld(size=size, seed=seed, max_objects=max_objects, length=per)
        for i in range(per):
            rec = world[i]
            texts.append(rec.caption)
            for q in rec.vqa:
                texts += [format_question(q, True), format_question(q, False), q["answer"], q["answer_letter"]]
            texts += [p["text"] for p in rec.prompts]
    return texts


def build_world_tokenizer(out_folder, vocab_size: int = WORLD_VOCAB_SIZE, records: int = 2000,
                          command: str | None = None) -> dict:
    """Train the world BPE and save it as a Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json,
    build_info.json with `command`, the corpus size and the tokenizers version).  Returns the build info.  The
    folder is written whole or not at all."""
    tokenizers = optional_import("tokenizers")
    Tokenizer, decoders, models, pre_tokenizers, trainers = optional_import(
        "tokenizers", "Tokenizer", "decoders", "models", "pre_tokenizers", "trainers")

    from ..utils import atomic_folder
    from .tokenizer import SPECIAL_TOKENS

    if not isinstance(vocab_size, int) or vocab_size < len(SPECIAL_TOKENS) + 256 + 1:
        raise ValueError(f"build_world_tokenizer: vocab_size must be an int > {len(SPECIAL_TOKENS) + 256} "
                         f"(specials + 256 bytes), got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = world_corpus(records)
    tok.train_from_iterator(corpus, trainer=trainer)
    out = Path(out_folder)
    info = {"vocab_size": tok.get_vocab_size(), "records": records, "corpus_texts": len(corpus),
            "corpus_chars": sum(len(t) for t in corpus),
            "corpus_tokens": sum(len(e.ids) for e in tok.encode_batch(corpus, add_special_tokens=False)),
            "command": command or f"umm build-tokenizer --out {os.fspath(out_folder)} --vocab-size {vocab_size} "
                                  f"--records {records}",
            "tokenizers": tokenizers.__version__}
    with atomic_folder(out) as tmp:
        tok.save(os.path.join(tmp, "tokenizer.json"))
        # a minimal config that transformers 4.x and 5.x both read (the specials are tokenizer.json's added tokens)
        Path(tmp, "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|pad|>",
             "model_max_length": 1 << 20}, indent=1) + "\n")
        Path(tmp, "build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
