"""Which loaded model reads a study (issue 15): each model card says what it was trained on
(`trained_on`: kind, modality, body part, view, population), the study's domain
(mrg_core.domain: DICOM tags, else the pixels) says what it is, and the two must match. A study
no model reads is refused with a message that says why; it is never sent to the wrong model.
"""
from __future__ import annotations

from mrg_core.domain import WORDS, Domain, dicom_kind


def model_kind(trained_on: dict | None) -> str | None:
    """The domain kind a model card's trained_on names ("kind", else from its modality)."""
    t = trained_on or {}
    return t.get("kind") or dicom_kind(t.get("modality"), t.get("body_part"))


def model_label(info: dict) -> str:
    """"name version (population)" of a model's info, for the routing line and refusals."""
    pop = (info.get("trained_on") or {}).get("population")
    return f"{info.get('name')} {info.get('version')}" + (f" (trained on {pop})" if pop else "")


def choose(models: list, seen: Domain | None):
    """The first model whose card's kind is the study's; the first model when the study's kind
    is unknown (no tags, no pixel classifier); None when no model reads it (see refusal)."""
    if not models:
        raise ValueError("no models to choose from")
    if seen is None:
        return models[0]
    return next((m for m in models if model_kind(m.config.trained_on) == seen.kind), None)


def refusal(models: list, seen: Domain) -> str:
    """Why a study is refused, in words: what it looks like and what the loaded models read."""
    reads = "; ".join(f"{WORDS.get(model_kind(m.config.trained_on), 'unknown studies')} → "
                      f"{model_label(m.info)}" for m in models)
    return (f"No model here reads this study: it looks like {seen.describe()}. Loaded models: "
            f"{reads}. No probability or draft is made; the images can still be read and a "
            "report written by hand.")


def routing_line(seen: Domain | None, info: dict) -> str:
    """What the study looks like and which model handles it, in words."""
    what = "a study of unknown kind" if seen is None else seen.describe()
    return f"{what} → {model_label(info)}"
