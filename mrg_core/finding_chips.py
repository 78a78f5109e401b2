"""Finding chips: the findings a model states before its draft, shown with their probabilities,
which the radiologist can flip ("no cavity", "ground glass: yes") before the draft is written
again. A model with `finding_prompt` writes its findings in words ahead of the report and was
trained with the true findings there (teacher forcing), so the decoder follows the chips.

The reader's chip state travels as `{label name: 0/1}` for every finding the model states; the
store keeps it with the correction, and fine-tuning learns the finding heads from it.
"""
from __future__ import annotations

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
