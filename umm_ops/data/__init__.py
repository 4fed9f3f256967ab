"""Data: MMD-Bench degradations (CLEAR), the synthetic world, dataset readers, tokenizers and span-batch packing."""
from .degradations import CATEGORIES, DEGRADATIONS, LEVELS, WEIGHTS, degrade, psnr, sample_kind
from .loader import PackedLoader
from .packing import (ImageItem, LogitNormalTimesteps, PackedBatch, PackSpec, Sample, TextItem, UniformTimesteps,
                      chat_sample, pack, unpack)
from .readers import BadRecord, CaptionReader, CocoReader, LlavaReader, VQAReader, WebDatasetReader
from .synthetic import SceneRecord, SyntheticWorld
from .tokenizer import ByteTokenizer, HFTokenizer, chat_template, load_tokenizer

__all__ = ["DEGRADATIONS", "LEVELS", "CATEGORIES", "WEIGHTS", "degrade", "sample_kind", "psnr",
           "ByteTokenizer", "HFTokenizer", "load_tokenizer", "chat_template",
           "TextItem", "ImageItem", "Sample", "PackSpec", "PackedBatch", "pack", "unpack", "chat_sample",
           "UniformTimesteps", "LogitNormalTimesteps", "PackedLoader",
           "SyntheticWorld", "SceneRecord", "LlavaReader", "CaptionReader", "WebDatasetReader", "CocoReader",
           "VQAReader", "BadRecord"]
