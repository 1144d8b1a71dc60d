"""Reply text and how it is cut: the canned reply, padding, word counts, tokens, chunk cuts."""

from __future__ import annotations

import re
from typing import Any, Iterable, TypeVar

SPLIT_TEXT = "Stand-in reply: héllo wörld — 日本語 ✓ 🎉"
VOCABULARY = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
BAD_BYTES = b"\xff\xfe"

_FILLER = " " + " ".join(VOCABULARY)
_TOKEN_RE = re.compile(r"\s*\S+|\s+")

_Seq = TypeVar("_Seq", str, bytes)


def message_text(content: Any) -> str:
    """Text of a message ``content``: a string, or OpenAI-style parts (their ``text`` joined).

    Parts without text (``image_url``, ``input_audio``...), ``None`` (an assistant turn
    with ``tool_calls``) and anything else give no text.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = (p.get("text") for p in content if isinstance(p, dict))
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def word_text(count: int) -> str:
    """``count`` deterministic words cycling over :data:`VOCABULARY`."""
    return " ".join(VOCABULARY[i % len(VOCABULARY)] for i in range(count))


def reply_text(prompt: str, *, words: int | None = None, split: bool = False) -> str:
    """The canned reply: ``Stand-in reply to: <prompt>`` or ``words`` words.

    With ``split`` the multi-byte :data:`SPLIT_TEXT` is put in front.
    """
    base = word_text(words) if words is not None else f"Stand-in reply to: {prompt}"
    return f"{SPLIT_TEXT} {base}" if split else base


def pad_reply(text: str, size: int | None) -> str:
    """``text`` followed by filler words up to exactly ``size`` UTF-8 bytes.

    A long reply for benchmarks: the canned text stays at the front, and a
    ``text`` already ``size`` bytes or longer is returned unchanged.
    """
    if size is None:
        return text
    need = size - len(text.encode("utf-8"))
    if need <= 0:
        return text
    filler = (_FILLER * (need // len(_FILLER) + 1))[:need]
    if filler.endswith(" "):
        filler = filler[:-1] + "."
    return text + filler


def word_count(text: str) -> int:
    """Whitespace word count: the stub's token estimate."""
    return len(text.split())


def tokens(text: str) -> list[str]:
    """``text`` as the stub's tokens: words with their leading whitespace (they join back to ``text``)."""
    return _TOKEN_RE.findall(text)


def even_cuts(length: int, parts: int) -> list[int]:
    """Interior offsets cutting ``length`` items into ``parts`` near-equal pieces."""
    parts = max(1, min(parts, length))
    size, extra = divmod(length, parts)
    cuts, offset = [], 0
    for index in range(parts - 1):
        offset += size + (1 if index < extra else 0)
        cuts.append(offset)
    return cuts


def cut_at(seq: _Seq, cuts: Iterable[int]) -> list[_Seq]:
    """Cut ``seq`` at the given offsets; never yields empty pieces."""
    if not seq:
        return []
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(seq)}), len(seq)]
    return [seq[a:b] for a, b in zip(bounds, bounds[1:])]


def split_evenly(seq: _Seq, parts: int) -> list[_Seq]:
    """``seq`` in at most ``parts`` near-equal non-empty pieces (``[]`` if empty)."""
    return cut_at(seq, even_cuts(len(seq), parts))


def multibyte_cuts(text: str) -> list[int]:
    """UTF-8 byte offsets one byte into every multi-byte character of ``text``."""
    cuts, offset = [], 0
    for char in text:
        size = len(char.encode("utf-8"))
        if size > 1:
            cuts.append(offset + 1)
        offset += size
    return cuts


def aivvm_chunks(text: str, parts: int, fault: str | None = None) -> list[bytes]:
    """Byte chunks of the Aivvm body for ``text``.

    ``fault="split"`` also cuts inside every multi-byte character (so at least
    one is certainly split when there is one); ``fault="badbytes"`` inserts
    :data:`BAD_BYTES` as its own chunk in the middle.
    """
    data = text.encode("utf-8")
    cuts = even_cuts(len(data), parts)
    if fault == "split":
        cuts += multibyte_cuts(text)
    chunks = cut_at(data, cuts)
    if fault == "badbytes":
        chunks.insert((len(chunks) + 1) // 2, BAD_BYTES)
    return chunks
