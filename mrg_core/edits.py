"""Keep a radiologist's own edits when the model writes its draft again (finding chips).

The editor holds the previous model draft as the radiologist changed it. Sentence by sentence
(difflib over the two sentence lists), what they wrote is theirs: sentences they added or
rewrote are kept, each after the model sentence it followed; model sentences they deleted or
rewrote stay out of the new draft even when the model writes them again. Everything else is
the new draft's.
"""
from __future__ import annotations

import difflib
import re

# A sentence ends at . ! or ? before whitespace (not inside "0.5 cm"), or at a line break.
_SENTENCE = re.compile(r".*?(?:[.!?](?=\s|$)|\n|$)\s*", re.S)


def sentences(text: str) -> list[str]:
    """The text cut into sentences, each with its trailing whitespace ("".join gives the
    text back); a line such as "Findings:" is a sentence of its own."""
    return [m.group(0) for m in _SENTENCE.finditer(text or "") if m.group(0)]


def _key(sentence: str) -> str:
    return " ".join(sentence.lower().split())


def keep_user_edits(previous_draft: str, editor_text: str, new_draft: str) -> str:
    """`new_draft` with the radiologist's edits of `previous_draft` (now `editor_text`)
    carried over; exactly `new_draft` when the editor still holds the previous draft."""
    prev = [s for s in sentences(previous_draft) if _key(s)]
    cur = [s for s in sentences(editor_text) if _key(s)]
    removed: set[str] = set()
    # (index in prev they came before, the break the user put before them, sentences)
    added: list[tuple[int, str, list[str]]] = []
    ops = difflib.SequenceMatcher(a=[_key(s) for s in prev], b=[_key(s) for s in cur],
                                  autojunk=False).get_opcodes()
    for op, i1, i2, j1, j2 in ops:
        if op in ("delete", "replace"):
            removed.update(_key(s) for s in prev[i1:i2])
        if op in ("insert", "replace"):
            before = cur[j1 - 1] if j1 > 0 else ""
            added.append((i1, before[len(before.rstrip()):], cur[j1:j2]))
    if not removed and not added:
        return new_draft
    out = [s for s in sentences(new_draft) if _key(s) not in removed]
    keys = [_key(s) for s in out]
    placed: list[tuple[int, str, list[str]]] = []
    for i1, gap, mine in added:
        anchor = _key(prev[i1 - 1]) if i1 > 0 else None
        if anchor is None:
            at = 0
        elif anchor in keys:
            at = keys.index(anchor) + 1
        else:  # the sentence it followed is gone: the same relative place in the new draft
            at = round(len(keys) * i1 / max(len(prev), 1))
        placed.append((at, gap, mine))
    # from the back, so earlier places stay valid; at one place, in the order they were written
    for _, (at, gap, mine) in sorted(enumerate(placed), key=lambda p: (p[1][0], p[0]),
                                     reverse=True):
        if at > 0 and "\n" in gap:  # the user's own line stays on its own line
            out[at - 1] = out[at - 1].rstrip() + gap
        out[at:at] = mine
    return _join(out)


def _join(parts: list[str]) -> str:
    """Sentences back into text: a space between two that had none (the last of a text)."""
    text = ""
    for s in parts:
        if text and not text[-1].isspace():
            text += " "
        text += s
    return text.rstrip()
