"""Text side of the model: tokenizers, prompt preparation and splitting long texts into chunks.

The model was trained on single sentences, so a long input is cut at sentence ends
(and, for very long sentences, at commas), regrouped into chunks of at most
`max_tokens` tokens, and each chunk is spoken independently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

SENTENCE_END_MARKS = ".!?\u2026"
WEAK_END_MARKS = ",;:-\u2013\u2014"
CLOSING_MARKS = "\"'\u201d\u2019)]\u00bb"
# The split probes: their first id is the bare word-start piece, the rest are the marks.
SENTENCE_END_PROBE = ".!...?"
CLAUSE_END_PROBE = ",;:"


class Tokenizer:
    """Text <-> ids with either backend of the released models (SentencePiece or `tokenizers` JSON)."""

    def __init__(self, path: Path, kind: str, vocab_size: int):
        if kind in ("tokenizers", "json") or path.suffix == ".json":
            import tokenizers

            self._hf = tokenizers.Tokenizer.from_file(str(path))
            self._sp = None
            actual = self._hf.get_vocab_size()
        elif kind == "sentencepiece":
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            self._hf = None
            actual = self._sp.vocab_size()
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'sentencepiece' or 'tokenizers')")
        if actual != vocab_size:
            raise ValueError(
                f"tokenizer {path} has {actual} entries but the config's lookup table has n_bins={vocab_size}"
            )

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text, out_type=int)
        return self._hf.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids)


@dataclass(frozen=True)
class TextOptions:
    """The text flags of a model config."""

    replace_characters: dict[str, str] = field(default_factory=dict)
    remove_semicolons: bool = False
    append_terminal_punctuation: bool = True
    capitalize_first_letter: bool = True
    pad_with_spaces_for_short_inputs: bool = False


def prepare_text(text: str, options: TextOptions) -> tuple[str, int]:
    """Normalise a prompt the way the model saw text in training.

    Returns the prepared text and the guess of frames to keep after EOS
    (short inputs trail off more slowly).
    """
    text = text.strip()
    if options.replace_characters:
        text = " ".join(text.translate(str.maketrans(options.replace_characters)).split())
        # A deleted quote can leave "Hi?, she said": keep the sentence mark, drop the stray comma.
        text = re.sub(r"([.!?\u2026])\s*[,;:]", r"\1", text)
    if not text:
        raise ValueError("text is empty")
    text = text.replace("\n", " ").replace("\r", " ").replace("  ", " ")
    if options.remove_semicolons:
        text = text.replace(";", ",")
    frames_after_eos_guess = 3 if len(text.split()) <= 4 else 1
    if options.capitalize_first_letter and not text[0].isupper():
        text = text[0].upper() + text[1:]
    if options.append_terminal_punctuation:
        text = _end_with_sentence_mark(text)
    if options.pad_with_spaces_for_short_inputs and len(text.split()) < 5:
        text = " " * 8 + text
    return text, frames_after_eos_guess


def _end_with_sentence_mark(text: str) -> str:
    body = text.rstrip(CLOSING_MARKS + " ")
    closers = text[len(body):].strip()
    if not body or body[-1] in SENTENCE_END_MARKS:
        return text
    if body[-1] in WEAK_END_MARKS:
        return body.rstrip(WEAK_END_MARKS + " ") + "." + closers
    return text + "."


def _segment_starts(ids: list[int], marks: set[int], tokenizer: Tokenizer | None = None) -> list[int]:
    """Indices where a segment starts: after each run of mark ids, plus 0 and len(ids).

    With a tokenizer, a period between two digits (a decimal number) is not a boundary.
    """
    starts = [0]
    after_mark = False
    for i, token in enumerate(ids):
        if token in marks:
            after_mark = True
            continue
        if after_mark and not (tokenizer is not None and _is_decimal_point(ids, i, tokenizer)):
            starts.append(i)
        after_mark = False
    starts.append(len(ids))
    return starts


def _is_decimal_point(ids: list[int], index: int, tokenizer: Tokenizer) -> bool:
    before = tokenizer.decode(ids[:index])
    after = tokenizer.decode(ids[index:])
    return len(before) >= 2 and before[-1] == "." and before[-2].isdigit() and after[:1].isdigit()


def _segments(ids: list[int], starts: list[int], tokenizer: Tokenizer) -> list[tuple[int, str]]:
    return [(end - start, tokenizer.decode(ids[start:end])) for start, end in zip(starts, starts[1:])]


def split_into_chunks(text: str, tokenizer: Tokenizer, max_tokens: int, options: TextOptions) -> list[str]:
    """Cut a text into chunks of whole sentences, each about `max_tokens` tokens or fewer."""
    prepared, _ = prepare_text(text, options)
    ids = tokenizer.encode(prepared.strip())

    sentence_marks = set(tokenizer.encode(SENTENCE_END_PROBE)[1:])
    sentences = _segments(ids, _segment_starts(ids, sentence_marks, tokenizer), tokenizer)

    clause_marks = set(tokenizer.encode(CLAUSE_END_PROBE)[1:])
    segments: list[tuple[int, str]] = []
    for count, sentence in sentences:
        if count > max_tokens:
            sub_ids = tokenizer.encode(sentence.strip())
            clauses = _segments(sub_ids, _segment_starts(sub_ids, clause_marks), tokenizer)
            if len(clauses) > 1:
                segments.extend(clauses)
                continue
        segments.append((count, sentence))

    chunks: list[str] = []
    current, current_count = "", 0
    for count, segment in segments:
        if not current:
            current, current_count = segment, count
        elif current_count + count > max_tokens:
            chunks.append(current.strip())
            current, current_count = segment, count
        else:
            current, current_count = f"{current} {segment}", current_count + count
    if current:
        chunks.append(current.strip())
    return chunks
