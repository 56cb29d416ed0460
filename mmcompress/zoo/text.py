"""The embedded models' text side: a word-level tokenizer and the exact prompt / answer formats.

The vocabulary is closed (every word ShapesVQA can produce plus a few spares), so a 100-odd-entry
``WordLevel`` model suffices; it is wrapped in ``PreTrainedTokenizerFast`` so the checkpoint loads with
plain ``AutoTokenizer`` / ``LlavaProcessor.from_pretrained``.
"""

from __future__ import annotations

import re

__all__ = [
    "IMAGE_TOKEN",
    "SPECIAL_TOKENS",
    "VOCAB_WORDS",
    "answer_from_text",
    "build_prompt",
    "build_tokenizer",
]

IMAGE_TOKEN = "<image>"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE_TOKEN)

VOCAB_WORDS: tuple[str, ...] = (
    # prompt scaffolding and punctuation
    "question",
    "answer",
    ":",
    "?",
    ".",
    ",",
    # question words (every ShapesVQA template)
    "what",
    "color",
    "colour",
    "is",
    "the",
    "a",
    "an",
    "shape",
    "object",
    "objects",
    "how",
    "many",
    "are",
    "there",
    "on",
    "or",
    "at",
    "of",
    "in",
    "image",
    "left",
    "right",
    "top",
    "bottom",
    "above",
    "below",
    "smallest",
    "largest",
    "biggest",
    "yes",
    "no",
    # colours (ShapesVQA uses the first six) and shapes
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "white",
    "orange",
    "gray",
    "black",
    "pink",
    "brown",
    "cyan",
    "circle",
    "square",
    "triangle",
    "star",
    "circles",
    "squares",
    "triangles",
    "stars",
    # counts
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "10",
)


def build_tokenizer():
    """A fresh ``PreTrainedTokenizerFast``: word-level, ``<s>`` prepended, ``<image>`` special.

    Deterministic: ids are the fixed order of ``SPECIAL_TOKENS + VOCAB_WORDS``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + VOCAB_WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()  # splits "?" and ":" off words
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, no punctuation spacing quirks
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=4096,
    )
    return tok


def build_prompt(question: str) -> str:
    """The exact prompt format the embedded models were trained with (one ``<image>`` placeholder)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question={question!r} is invalid; allowed: a non-empty string")
    return f"{IMAGE_TOKEN}\nquestion: {question.strip()} answer:"


def answer_from_text(generated: str) -> str:
    """The first word of the generated continuation (the models answer in one word, then ``</s>``)."""
    parts = re.split(r"answer\s*:", generated)
    text = (
        parts[-1] if len(parts) > 1 else generated
    )  # a decoded full sequence rather than only the new tokens
    text = text.split(EOS)[0].replace(BOS, " ").replace(PAD, " ")
    words = re.findall(r"[A-Za-z0-9]+", text)
    return words[0].lower() if words else ""
