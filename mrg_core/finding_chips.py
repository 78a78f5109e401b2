"""Finding chips: the findings a model states before its draft, shown with their probabilities,
which the radiologist can flip ("no cavity", "ground glass: yes") before the draft is written
again. A model with `finding_prompt` writes its findings in words ahead of the report and was
trained with the true findings there (teacher forcing), so the decoder follows the chips.

The reader's chip state travels as `{label name: 0/1}` for every finding the model states; the
store keeps it with the correction, and fine-tuning learns the finding heads from it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class FindingChip:
    name: str  # the label name (config.labels), e.g. "ground_glass"
    phrase: str  # how the draft's prompt says it (config.finding_phrases)
    probability: float  # the finding head's raw probability
    predicted: bool  # past its threshold: stated unless the reader flips it

    def to_dict(self) -> dict:
        return {"name": self.name, "phrase": self.phrase,
                "probability": round(self.probability, 4), "predicted": self.predicted}


def finding_chips(model, labels: dict[str, float], findings: tuple[str, ...]
                  ) -> tuple[FindingChip, ...]:
    """One chip per finding the model states in words (none for other models), in the
    model's label order; `findings` are the predicted ones (Prediction.findings)."""
    phrases = model.config.finding_phrases
    return tuple(FindingChip(n, phrases[n], float(labels[n]), n in findings)
                 for n in model.finding_names)


def chip_state(chips: tuple[FindingChip, ...], ticked) -> dict[str, int]:
    """{name: 1 if ticked else 0} for every chip; a ticked name that is not a chip is refused
    (a page or script asking for a finding this model cannot state)."""
    ticked = set(ticked or ())
    unknown = ticked - {c.name for c in chips}
    if unknown:
        raise ValueError(f"not a finding chip of this study: {sorted(unknown)}")
    return {c.name: int(c.name in ticked) for c in chips}


def flipped(chips: tuple[FindingChip, ...], state: dict[str, int]) -> list[str]:
    """The chips whose state differs from the model's prediction, in chip order."""
    return [c.name for c in chips if c.name in state and bool(state[c.name]) != c.predicted]


def stated_with(chips: tuple[FindingChip, ...], overrides: dict[str, int]) -> tuple[str, ...]:
    """The finding names a draft states: the predicted chips with `overrides` ({name: 0/1})
    applied; a name that is no chip is refused (ValueError, naming those it can state)."""
    unknown = sorted(set(overrides) - {c.name for c in chips})
    if unknown:
        raise ValueError(f"--finding {', '.join(unknown)}: not a finding this model states "
                         f"({', '.join(c.name for c in chips) or 'it states none'})")
    return tuple(c.name for c in chips if overrides.get(c.name, int(c.predicted)))


def parse_finding_args(values: list[str]) -> dict[str, int]:
    """CLI `--finding NAME=yes|no` (repeatable) → {name: 0/1}."""
    out: dict[str, int] = {}
    for v in values or []:
        name, sep, value = v.partition("=")
        value = value.strip().lower()
        if not sep or value not in ("yes", "no", "1", "0", "true", "false"):
            raise ValueError(f"--finding {v!r}: write NAME=yes or NAME=no")
        out[name.strip()] = int(value in ("yes", "1", "true"))
    return out


# ----------------------------------------------------------------------------- following chips
# A flipped chip edits the draft the radiologist had, clause by clause, instead of replacing it:
# clauses that state a finding (or a lobe) now unticked go, newly ticked ones come from the
# draft the model wrote with the chips, and a ticked finding the model still did not write is
# stated plainly. Everything else of the previous draft stays word for word. Read with the
# rule-based finding reader (mrg_core.evaluation.clinical), which the chip benchmark scores.

# A clause: up to , ; : . ! ? before whitespace (not inside "0.5 cm"), with what follows it.
_CLAUSE = re.compile(r".*?(?:[.;,:!?](?=\s|$)|$)\s*", re.S)


def _clauses(text: str) -> list[str]:
    return [m.group(0) for m in _CLAUSE.finditer(text or "") if m.group(0).strip()]


def _read(clause: str, chips: set[str]) -> set[str]:
    from mrg_core.evaluation.clinical import extract_findings

    return extract_findings(clause) & chips


def _plural(phrases: list[str]) -> bool:
    last = phrases[-1].split()[-1]
    return len(phrases) > 1 or (last.endswith("s") and not last.endswith("ss"))


def _stated_plainly(missing: list[str], should: list[str], ticked: list[str],
                    phrases: dict[str, str], findings: list[str], said: set[str]) -> list[str]:
    """Clauses for chips to state that no model clause states: the findings where the
    draft's lesions are (the lobes it is to state), then a lobe no finding is placed in yet,
    with a finding the draft states (else one to state, else a ticked one; none: a lobe alone
    is no finding, and is left out)."""
    lobes = [n for n in should if n not in findings]
    where = [f"the {phrases[n]}" for n in lobes if n != "bilateral"]
    place = (" and ".join(where) if where else
             "both lungs" if "bilateral" in lobes else "the lungs")
    out = []
    what = [phrases[n] for n in missing if n in findings]
    if what:
        verb = "were" if _plural(what) else "was"
        out.append(f"{' and '.join(what)} {verb} seen in {place}")
    placed = set(lobes) if what else set()  # the lobes the clause above names
    lost = [n for n in missing if n not in findings and n not in placed]
    shown = ([phrases[n] for n in findings if n in said] or
             [phrases[n] for n in findings if n in should or n in ticked])[:1]
    if lost and shown:
        verb = "were" if _plural(shown) else "was"
        out.append(f"{shown[0]} {verb} also seen in " + (
            " and ".join(f"the {phrases[n]}" for n in lost if n != "bilateral") or "both lungs"))
    return out


def _split(clause: str) -> list[str]:
    """[words, the punctuation and space after them]."""
    m = re.search(r"[.;,:!?]?\s*$", clause)
    return [clause[:m.start()], clause[m.start():]]


def follow_chips(previous: str, previous_stated, text: str, stated, chip_names,
                 phrases: dict[str, str], findings) -> str:
    """`previous` (the findings text the radiologist had, written with the chips
    `previous_stated`) edited for the flips to the chips `stated`, with `text` (the model's
    draft written with `stated`) as the source of new clauses.

    Clauses stating a chip flipped off go. What must then be stated, the chips flipped on and
    whatever else the clauses that went stated, comes from `text`'s clauses where one states
    it and nothing else (no chip it must not state), else is stated plainly, where the first
    clause left out was (else after the last clause stating a chip, else before the last
    clause). Every other clause stays word for word. `chip_names`: every chip; `findings`:
    those that are findings (the rest are lobes)."""
    chips, ticked = set(chip_names), [n for n in chip_names if n in set(stated)]
    before = set(previous_stated or ())
    drop = (chips - set(ticked)) & before  # flipped off
    units: list[list[str]] = []  # [words, punctuation after them] of the kept clauses
    said_before, at = set(), None
    for c in _clauses(previous):
        read = _read(c, chips)
        said_before |= read
        if read & drop:
            at = len(units) if at is None else at
            if units and re.search(r"[.!?]", _split(c)[1]):
                units[-1][1] = _split(c)[1]  # the sentence ended with the clause left out
            continue
        units.append(_split(c))
    # what the text is to state: what it stated less the chips flipped off, and those flipped on
    should = (said_before - drop) | (set(ticked) - before)
    said = set().union(set(), *(_read(w, chips) for w, _ in units))
    missing = [n for n in chip_names if n in should and n not in said]
    added = []
    for c in _clauses(text) if missing else ():
        read = _read(c, chips)
        if read & set(missing) and not read - should:
            added.append(_split(c)[0].strip())
            missing = [n for n in missing if n not in read]
            said |= read
    added += _stated_plainly(missing, [n for n in chip_names if n in should], ticked,
                             phrases, list(findings), said)
    if not added and len(units) == len(_clauses(previous)):
        return previous
    if at is None:
        at = max((i + 1 for i, (w, _) in enumerate(units) if _read(w, chips)),
                 default=max(len(units) - 1, 0))
    for words in reversed(added):
        if at > 0:  # the new clause takes the place's punctuation; a comma before it
            if words[1:2].islower():  # a sentence's first word, now inside one
                words = words[:1].lower() + words[1:]
            units.insert(at, [words, units[at - 1][1]])
            units[at - 1][1] = ", "
        else:
            units.insert(0, [words, ", "])
    if units:
        if not re.search(r"[.!?]", units[-1][1]):
            units[-1][1] = "."
        units[0][0] = units[0][0].lstrip()
        units[0][0] = units[0][0][:1].upper() + units[0][0][1:]
    return "".join(w + p for w, p in units).rstrip()
