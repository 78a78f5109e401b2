"""Report text: cleaning as in the report-generation literature, and tokenizer training.

Cleaning follows R2Gen / MRG-LLM practice: lower case, numbering removed, punctuation split into
tokens, whitespace collapsed. The same function runs on references and generated text before
any metric, so scores compare like with like.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "[PAD]", "bos_token": "[BOS]", "eos_token": "[EOS]",
                  "unk_token": "[UNK]"}

_NUMBERING = re.compile(r"(^|\s)(\d+[.)]|[a-z][.)]|[ivx]+\.)\s+")
_PUNCT = re.compile(r"([.,;:!?()\[\]/])")
_SPACES = re.compile(r"\s+")


def clean_report(text: str) -> str:
    """Lower-case, drop list numbering, make punctuation separate tokens, collapse spaces."""
    t = (text or "").lower().replace("\u2019", "'")
    t = _NUMBERING.sub(" ", t)
    t = t.replace("_", " ")
    t = _PUNCT.sub(r" \1 ", t)
    t = _SPACES.sub(" ", t).strip()
    return t


def detokenize(text: str) -> str:
    """Readable form of cleaned text: no space before punctuation, sentences capitalised."""
    t = re.sub(r"\s+([.,;:!?)\]])", r"\1", text)
    t = re.sub(r"([(\[])\s+", r"\1", t)
    sentences = re.split(r"(?<=[.!?])\s+", t.strip())
    return " ".join(s[:1].upper() + s[1:] for s in sentences if s)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000, min_frequency: int = 2,
                    kind: str = "wordlevel") -> PreTrainedTokenizerFast:
    """Train a tokenizer offline on (cleaned) report text.

    "wordlevel" splits on whitespace: every token decodes to a whole word, so streamed text never
    shows broken characters (a byte-level BPE on a small model does). "bpe" gives a whitespace
    BPE for larger vocabularies.
    """
    specials = list(SPECIAL_TOKENS.values())
    if kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=specials)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=specials)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "bpe":
        from tokenizers import decoders
        tok.decoder = decoders.BPEDecoder()
    tok.train_from_iterator((clean_report(t) for t in texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.padding_side = "right"
    return fast
