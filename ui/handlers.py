"""What each button does, as plain functions: call the engine, format the result.

No gradio, torch or SQL here, so every step of the page can be tested without a browser.
`ui/layout.py` maps these results onto widgets.
"""
from __future__ import annotations

import difflib
import hashlib
import html
import logging
import os
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mrg_core import report_export, report_sr
from mrg_core.domain import WORDS
from mrg_core.edits import keep_user_edits
from mrg_core.engine import Engine, ModelNotLoaded, NoModelForStudy
from mrg_core.io import StudyLoadError
from mrg_core.paths import SAMPLES_DIR
from mrg_core.routing import model_kind, model_label
from mrg_core.storage import (ACCEPTED, KIND_LABELS, REVIEWER_REQUIRED, InvalidCorrection,
                              StoreError)
from mrg_core.study import CT_WINDOWS

from .upload_cache import discard_uploads
from .state import Session

log = logging.getLogger(__name__)

FILE_TYPES = [".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".zip"]  # a zip: its files
SAMPLE_SUFFIXES = {".dcm", ".png", ".jpg", ".jpeg", ".zip"}  # a zip: a series
WINDOW_PRESETS = ["default", *CT_WINDOWS, "custom"]  # default = the file's own window
NO_MODEL = ("**No model loaded.** Studies can be viewed and reports written and saved by "
            "hand; no probability, heat map or draft is made.")
NOT_CLINICAL = "Research demo, not for clinical use."
NOT_READ = "**No model reads this study:** no probability, heat map or draft."
TEXT_NOT_FROM_IMAGES = ("This model's draft wording was not learned from paired images (report "
                        "text alone): the draft states the decision, not what this image shows.")


# ----------------------------------------------------------------------------- header

def model_info_markdown(engine: Engine) -> str:
    info = engine.model_info
    store = f"\n\n⚠️ {engine.store_warning}" if getattr(engine, "store_warning", None) else ""
    if info is None:
        why = getattr(engine, "missing_weights", None)
        why = f" The model could not load: {_md(why)}." if why else ""
        return f"{NO_MODEL}{why} {NOT_CLINICAL}{store}"
    trained = info.get("trained_on") or {}
    if isinstance(trained, dict):
        what = " ".join(str(trained[k]) for k in ("modality", "body_part") if trained.get(k))
        if trained.get("description"):
            what = f"{what} ({trained['description']})" if what else str(trained["description"])
    else:
        what = str(trained)
    parts = [f"Model **{_md(info.get('name', '?'))}** version {_md(info.get('version', '?'))}"]
    if what:
        parts.append(f"trained on {_md(what)}")
    if info.get("threshold") is not None:
        parts.append(f"threshold {float(info['threshold']):.2f}")
    for m in getattr(engine, "extra_models", ()):  # routed by what the study looks like
        parts.append(f"{_md(WORDS.get(model_kind(m.config.trained_on), 'other studies'))} → "
                     f"{_md(model_label(m.info))}")
    why = getattr(engine, "missing_weights", None)  # a further model that could not load
    missing = f"\n\n⚠️ A model could not load: {_md(why)}" if why else ""
    return " · ".join(parts) + f" · **{NOT_CLINICAL}**{missing}{store}"


def list_samples(folder: Path = SAMPLES_DIR) -> list[tuple[str, str]]:
    """(label, path) for the bundled synthetic sample files."""
    if not folder.is_dir():
        return []
    return [(p.name, str(p)) for p in sorted(folder.iterdir()) if p.suffix.lower()
            in SAMPLE_SUFFIXES]


# ----------------------------------------------------------------------------- load + analyse

@dataclass
class Loaded:
    ok: bool
    message: str  # Markdown: what was loaded, or why not
    n_views: int = 0
    is_ct: bool = False  # values are Hounsfield units: offer CT window presets
    # (label, index) of each DICOM series of the upload when it held several (the page's
    # Series menu), and the index of the one shown; empty for a one-study upload.
    series_choices: list = field(default_factory=list)
    series_index: int = 0


def load_files(engine: Engine, session: Session, files) -> Loaded:
    """Uploaded paths (or (name, bytes) pairs; zips and folders count as their files) → the
    session's study. Files of several DICOM series are kept side by side: the first is shown
    and the page offers the others (choose_series). Never raises."""
    files = [f for f in (files or []) if f]
    if not files:
        return Loaded(False, "Choose one or more DICOM, PNG or JPEG files (or a zip) first.")
    try:
        studies = engine.load_series(files)
    except StudyLoadError as exc:
        return Loaded(False, f"**Could not load the study.** {_md(exc.message)}")
    except Exception as exc:  # never a traceback on the page
        log_failure("loading a study", exc)
        return Loaded(False, "**Could not load the study.** The file could not be read; "
                             "please export it again as DICOM, PNG or JPEG.")
    finally:  # the uploaded originals (patient data inside) go; the study is de-identified
        discard_uploads(files)
    names = ", ".join(_name(f) for f in files[:3]) + (f" … ({len(files)} files)"
                                                      if len(files) > 3 else "")
    session.series = list(studies) if len(studies) > 1 else []
    session.upload_label = names
    return _show_series(session, 0, studies[0])


def choose_series(engine: Engine, session: Session, index) -> Loaded:
    """The Series menu: series `index` of the last upload becomes the session's study (a new
    study for analysis, drafts, saves and exports). Never raises."""
    try:
        i = int(index)
    except (TypeError, ValueError):
        i = -1
    if not 0 <= i < len(session.series):
        return Loaded(False, "That series is not part of the files loaded.")
    return _show_series(session, i, session.series[i])


def same_series(session: Session, index) -> bool:
    """True when the Series menu names the series already shown (nothing to reload)."""
    try:
        i = int(index)
    except (TypeError, ValueError):
        return False
    return bool(session.series) and i == session.series_index and \
        session.study is session.series[i]


def _show_series(session: Session, index: int, study) -> Loaded:
    names, n = session.upload_label, len(session.series)
    session.series_index = index
    if n > 1:
        label = f"{names} (series {index + 1} of {n})"
        message = (f"Loaded {_md(names)}: {n} series. Showing {study_description(study)}. "
                   "Choose another under **Series**.")
    else:
        label, message = names, f"Loaded {_md(names)}: {study_description(study)}."
    session.reset_study(study, label)
    log.info("study %s loaded: %s", study.content_hash[:10], study_description(study))
    return Loaded(True, message + gap_note(study), n_views=len(study.views),
                  is_ct=_is_ct(study), series_choices=series_choices(session),
                  series_index=index)


def series_choices(session: Session) -> list[tuple[str, int]]:
    """(label, index) for the Series menu: each series described by SeriesInfo.describe(),
    numbered when two would read the same."""
    labels = [s.series.describe() if s.series is not None else f"study {i + 1}"
              for i, s in enumerate(session.series)]
    if len(set(labels)) < len(labels):
        labels = [f"{i + 1}. {x}" for i, x in enumerate(labels)]
    return [(x, i) for i, x in enumerate(labels)]


def load_sample(engine: Engine, session: Session, path: str | None) -> Loaded:
    if not path:
        return Loaded(False, "Pick a sample first.")
    return load_files(engine, session, [path])


def study_description(study) -> str:
    m = study.views[0].meta
    kind = " ".join(x for x in (m.modality, m.body_part, m.view_position) if x)
    kind = kind or m.source_format.upper()
    n = len(study.views)
    if study.series is not None and n > 1:  # a one-file "series" reads as a view
        return f"{kind}, {series_summary(study.series)}, {view_sizes(study)}"
    return f"{kind}, {n} view{'s' if n != 1 else ''}, {view_sizes(study)}"


ORDER_NOTES = {"instance_number": "ordered by instance number (the files give no slice "
                                  "positions)",
               "given": "in the order given (the files give no slice positions or numbers)"}


def series_summary(info) -> str:
    """'series 2 (B40f): 30 slices, 1 mm thick, 1 mm apart' (the modality is said before)."""
    n = info.series_number if info.series_number is not None else info.index
    text = f"series {n}" + (f" ({_md(info.kernel)})" if info.kernel else "")
    text += f": {info.n_slices} slice{'s' if info.n_slices != 1 else ''}"
    if info.slice_thickness_mm:
        text += f", {info.slice_thickness_mm:g} mm thick"
    if info.spacing_mm:
        text += f", {info.spacing_mm:g} mm apart"
    if info.ordered_by in ORDER_NOTES:
        text += f", {ORDER_NOTES[info.ordered_by]}"
    return text


def gap_note(study) -> str:
    """A warning sentence when slices seem to be missing from a series ('' otherwise): where,
    and how wide each gap is against the usual spacing."""
    info = study.series
    if info is None or not info.gaps_after:
        return ""
    after, sizes = [], []
    for i in info.gaps_after:
        a, b = (study.views[j].meta.slice_position for j in (i, i + 1))
        after.append(str(i + 1))
        if a is not None and b is not None:
            sizes.append(f"{abs(a - b):g}")
    one = len(after) == 1
    where = (f"the gap after slice {after[0]}" if one else
             f"the gaps after slices {', '.join(after[:-1])} and {after[-1]}")
    wide = ""
    if len(sizes) == len(after):
        wide = f" {'is' if one else 'are'} " + (
            sizes[0] if one else ", ".join(sizes[:-1]) + " and " + sizes[-1]) + " mm,"
    else:
        wide = f" {'is' if one else 'are'} wider,"
    return (f"  \n⚠ **Slices seem to be missing:** {where} of {info.n_slices}{wide} where the "
            f"others are {info.spacing_mm:g} mm apart.")


def view_sizes(study) -> str:
    """Every view's size: '512×512 px' when they agree, each distinct size in view order when
    there are up to three, else the range (smallest to largest by pixel count)."""
    sizes = list(dict.fromkeys((v.meta.columns, v.meta.rows) for v in study.views))
    if len(sizes) == 1:
        return f"{sizes[0][0]}×{sizes[0][1]} px"
    if len(sizes) <= 3:
        return ", ".join(f"{c}×{r}" for c, r in sizes) + " px"
    lo, hi = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
    return f"{len(sizes)} sizes from {lo[0]}×{lo[1]} to {hi[0]}×{hi[1]} px"


@dataclass
class AnalysisView:
    warning: str | None  # out-of-domain alert (shown above the probability), or None
    probability: str  # Markdown
    # A fresh analysis of several views/slices: the view to open the viewer on (the key slice,
    # 0-based); None = leave the viewer where it is.
    open_view: int | None = None


def analyze(engine: Engine, session: Session) -> AnalysisView:
    if session.study is None:
        return AnalysisView(None, "")
    if session.analysis is not None:  # already analysed (e.g. a failed load kept the study)
        a = session.analysis
        return AnalysisView(a.domain_warning, analysis_text(a, session.study))
    if engine.model is None:
        return AnalysisView(None, NO_MODEL)
    try:
        session.analysis = a = engine.analyze(session.study)
    except NoModelForStudy as exc:  # the refusal says why, where a warning would stand
        return AnalysisView(str(exc), NOT_READ)
    except ModelNotLoaded:
        return AnalysisView(None, NO_MODEL)
    except Exception as exc:
        log_failure("analysis", exc)
        return AnalysisView(engine.domain_warning(session.study),
                            "**The model could not analyse this study.** The images can still "
                            "be read and a report written by hand.")
    keys = a.key_views if a.view_probabilities else ()
    return AnalysisView(a.domain_warning, analysis_text(a, session.study),
                        open_view=keys[0] if keys else None)


def analysis_text(a, study) -> str:
    """The probability line; for several views/slices also how they were combined."""
    text = probability_text(a.probability, a.threshold, a.findings)
    if getattr(a, "label_meaning", ""):  # what the number is of: the CT model is not a CXR one
        text += f"  \nThe model's label: {_md(a.label_meaning)}"
    if getattr(a, "routing", ""):  # what the study looks like and which model read it
        text += f"  \nRead as {_md(a.routing)}"
    if (getattr(a, "model", None) or {}).get("text_from_images") is False:
        text += f"  \n{TEXT_NOT_FROM_IMAGES}"
    probs = a.view_probabilities
    if probs and a.key_views and study is not None:
        word = "slice" if study.series is not None or _is_ct(study) else "view"
        rule = f" by the {_md(a.aggregation)} rule" if a.aggregation else ""
        text += (f"  \nFrom {len(probs)} {word}s{rule}; key {word} {a.key_views[0] + 1} "
                 f"(p {probs[a.key_views[0]]:.2f}).")
    return text


def warning_html(warning: str | None) -> str:
    return (f'<div class="mrg-alert" role="alert">⚠ {html.escape(warning)}</div>'
            if warning else "")


def probability_text(probability: float, threshold: float,
                     findings: tuple[str, ...] = ()) -> str:
    call = "positive" if probability >= threshold else "negative"
    text = f"Pneumonia probability {probability:.2f} (threshold {threshold:.2f} → {call})"
    if findings:  # the model's image-level findings, which its draft is asked to state
        text += "  \nImage findings: " + ", ".join(findings)
    return text


# ----------------------------------------------------------------------------- finding chips

REDRAFT_NEEDS_CHIPS = "This model states no findings in words: there are no chips to redraft with."


@dataclass
class ChipsView:
    choices: list  # (label shown, finding name)
    ticked: list  # finding names ticked
    visible: bool


def chips_view(session: Session) -> ChipsView:
    """The analysis' finding chips: every finding the draft can state with its probability,
    the predicted ones ticked. None for a model without finding words."""
    chips = getattr(session.analysis, "chips", ()) or ()
    return ChipsView([(f"{c.phrase} · {c.probability:.0%}", c.name) for c in chips],
                     [c.name for c in chips if c.predicted], bool(chips))


def _chip_state(session: Session, ticked) -> tuple[dict | None, list]:
    """(the reader's chips {name: 0/1}, the names they flipped), or (None, []) without chips."""
    from mrg_core.finding_chips import chip_state, flipped

    chips = getattr(session.analysis, "chips", ()) or ()
    if not chips or ticked is None:
        return None, []
    state = chip_state(chips, ticked)
    return state, flipped(chips, state)


def redraft_with_findings(engine: Engine, session: Session, editor_text: str, ticked,
                          update_every_s: float = 0.0) -> Iterator[StreamUpdate]:
    """Write the draft again stating the ticked findings (the decoder is conditioned on
    them), with the radiologist's own edits of the previous draft carried over
    (mrg_core.edits.keep_user_edits)."""
    if session.study is None or session.analysis is None:
        yield StreamUpdate(None, None, "Load a study and wait for its analysis first.",
                           done=True)
        return
    try:
        state, flips = _chip_state(session, ticked)
    except ValueError as exc:
        yield StreamUpdate(None, None, f"**No draft:** {_md(str(exc))}", done=True)
        return
    if state is None:
        yield StreamUpdate(None, None, REDRAFT_NEEDS_CHIPS, done=True)
        return
    chosen = tuple(n for n, v in state.items() if v)
    yield from stream_draft(engine, session, editor_text, update_every_s=update_every_s,
                            findings=chosen, flips=flips)


# ----------------------------------------------------------------------------- grounding

GROUNDING_NOTE = ("Select a sentence to see where in the image its words come from: the "
                  "gradient × activation of that sentence's likelihood at the image encoder "
                  "(experimental: checked on synthetic studies, where 78-98 % of sentences "
                  "peak on their own finding, not on real lesions).")
NO_STATEMENT = -1  # the choice that brings back the decision's Grad-CAM


@dataclass
class GroundingView:
    visible: bool
    choices: list  # (label shown, statement index); NO_STATEMENT first
    message: str  # Markdown


def ground_draft(engine: Engine, session: Session) -> GroundingView:
    """Ground each sentence of the latest draft (as drafted: the chips it was written from),
    for the page's sentence list; nothing to show without a draft or a model that sees the
    image."""
    from mrg_core.grounding import NoGrounding

    session.grounding, session.grounded = None, None
    if session.study is None or engine.model is None or not (session.draft or "").strip():
        return GroundingView(False, [], "")
    stated = (session.draft_findings or {}).get("stated")
    try:
        view, found = engine.ground(session.study, session.draft, findings=stated)
    except (NoGrounding, NoModelForStudy) as exc:
        return GroundingView(True, [], f"No sentence maps: {_md(str(exc))}")
    except Exception as exc:
        log_failure("sentence grounding", exc)
        return GroundingView(True, [], "The sentence maps could not be made.")
    session.grounding = (view, found)
    choices = [("None: the decision's Grad-CAM", NO_STATEMENT)]
    for k, g in enumerate(found):
        share = "" if g.lung_share is None else f", {g.lung_share:.0%} in the lungs"
        words = g.text if len(g.text) <= 90 else g.text[:87] + "…"
        choices.append((f"{k + 1}. {words} (peak {g.to_dict()['peak_region']}{share})", k))
    return GroundingView(True, choices, GROUNDING_NOTE)


def select_statement(session: Session, choice) -> int | None:
    """The viewer shows the chosen sentence's map (NO_STATEMENT: the Grad-CAM again); returns
    the view (0-based) its map is on, for the slider, or None."""
    if session.grounding is None or choice is None or int(choice) == NO_STATEMENT:
        session.grounded = None
        return None
    view, found = session.grounding
    k = int(choice)
    session.grounded = k if 0 <= k < len(found) else None
    return view if session.grounded is not None else None


def statement_map(session: Session, index: int) -> np.ndarray | None:
    """The selected sentence's map when the viewer is on its view, else None."""
    if session.grounding is None or session.grounded is None:
        return None
    view, found = session.grounding
    return found[session.grounded].maps[0] if index == view else None


# ----------------------------------------------------------------------------- viewer

def render_view(engine: Engine, session: Session, index: int = 0, preset: str = "default",
                centre: float | None = None, width: float | None = None,
                show_overlay: bool = True, opacity: float = 0.4) -> np.ndarray | None:
    """RGB uint8 image of one view: windowed, with the Grad-CAM heat map when asked. A slice
    of a series whose map is not made yet gets it now (kept in the analysis: going back to it
    is instant)."""
    study, a = session.study, session.analysis
    if study is None:
        return None
    views = study.views
    i = min(max(int(index or 0), 0), len(views) - 1)
    grey = _windowed(views[i], preset, centre, width)
    heat = statement_map(session, i)  # a selected sentence's map first
    if heat is None and show_overlay:
        heat = view_map(engine, study, a, i)
    if heat is not None:
        return engine.overlay(grey, heat, float(opacity))
    return np.stack([grey] * 3, axis=-1)


def view_map(engine: Engine, study, analysis, index: int) -> np.ndarray | None:
    """The Grad-CAM map of view `index`: the analysis' own, else computed now and kept there
    (engine.view_heatmap; a series' analysis fills only its key slice). None without an
    analysis or when it cannot be made."""
    if analysis is None:
        return None
    maps = analysis.heatmaps
    if maps is None or len(maps) != len(study.views) or not 0 <= index < len(maps):
        return None  # not this study's analysis (a series was switched meanwhile)
    if maps[index] is None and len(maps) > 1 and engine.model is not None:
        try:
            maps[index] = engine.view_heatmap(study, index)
        except Exception as exc:  # the view is shown without its map
            log_failure("computing a slice heat map", exc)
    return maps[index]


SLICE_PLOT_SIZE = (600, 120)  # the plot's viewBox; it scales to the column's width


def slice_info_html(session: Session, index: int = 0) -> str:
    """Under the viewer, for a study of several views/slices: where the viewer is ('slice 5/30:
    p 0.50 — key slice') and a small inline-SVG plot of the slice-wise probabilities with the
    study threshold and the current slice marked. '' for a single view."""
    study, a = session.study, session.analysis
    if study is None or len(study.views) < 2:
        return ""
    n = len(study.views)
    i = min(max(int(index or 0), 0), n - 1)
    word = "slice" if study.series is not None or _is_ct(study) else "view"
    probs = None if a is None else a.view_probabilities
    if not probs or len(probs) != n:
        return f'<div class="mrg-slice-text" data-slice="{i + 1}">{word} {i + 1}/{n}</div>'
    keys = tuple(a.key_views)
    text = f"{word} {i + 1}/{n}: p {probs[i]:.2f}"
    if keys and i == keys[0]:
        text += f" — key {word}"
    elif i in keys:
        text += f" — among the {len(keys)} most probable {word}s"
    rule = f" by the {html.escape(str(a.aggregation))} rule" if a.aggregation else ""
    caption = (f"{word.capitalize()} probabilities; study p {a.probability:.2f}{rule}; "
               f"dashed line: study threshold {a.threshold:.2f}; "
               f"◆ the {len(keys)} most probable {word}s")
    return (f'<div class="mrg-slice-text" data-slice="{i + 1}">{text}</div>'
            + slice_plot_svg(probs, a.threshold, i, keys, word)
            + f'<div class="mrg-slice-caption">{caption}</div>')


def slice_plot_svg(probs, threshold: float, current: int, keys=(), word: str = "slice") -> str:
    """Probability (0..1, up) against slice (1..n, right): the curve, the threshold as a dashed
    line, key slices as diamonds, the current slice as a vertical line and a dot."""
    width, height = SLICE_PLOT_SIZE
    left, right, top, bottom = 30, 10, 8, 20
    w, hgt, n = width - left - right, height - top - bottom, len(probs)

    def x(i: int) -> float:
        return left + (w * i / (n - 1) if n > 1 else w / 2)

    def y(p: float) -> float:
        return top + hgt * (1.0 - min(max(float(p), 0.0), 1.0))

    points = " ".join(f"{x(i):.1f},{y(p):.1f}" for i, p in enumerate(probs))
    ty, cx, cy = y(threshold), x(current), y(probs[current])
    label = (f"{word} probabilities of {n} {word}s; {word} {current + 1} is {probs[current]:.2f}; "
             f"threshold {threshold:.2f}")
    parts = [
        f'<svg class="mrg-slice-plot" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{label}" data-n="{n}" data-current="{current + 1}">',
        f'<rect x="{left}" y="{top}" width="{w}" height="{hgt}" fill="none" '
        'stroke="currentColor" stroke-opacity="0.25"/>',
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end" font-size="10" '
        'fill="currentColor">1</text>',
        f'<text x="{left - 4}" y="{top + hgt}" text-anchor="end" font-size="10" '
        'fill="currentColor">0</text>',
        f'<text x="{left}" y="{height - 5}" font-size="10" fill="currentColor">1</text>',
        f'<text x="{left + w}" y="{height - 5}" text-anchor="end" font-size="10" '
        f'fill="currentColor">{n}</text>',
        f'<line class="mrg-threshold" x1="{left}" x2="{left + w}" y1="{ty:.1f}" y2="{ty:.1f}" '
        'stroke="#dc2626" stroke-dasharray="5 4" stroke-width="1.2"/>',
        f'<polyline class="mrg-curve" points="{points}" fill="none" stroke="#2563eb" '
        'stroke-width="1.6" stroke-linejoin="round"/>',
    ]
    for k in keys:
        kx, ky = x(k), y(probs[k])
        parts.append(f'<path class="mrg-key" d="M{kx:.1f} {ky - 5:.1f} L{kx + 4:.1f} {ky:.1f} '
                     f'L{kx:.1f} {ky + 5:.1f} L{kx - 4:.1f} {ky:.1f} Z" fill="#7c3aed"/>')
    parts += [
        f'<line class="mrg-current-line" x1="{cx:.1f}" x2="{cx:.1f}" y1="{top}" '
        f'y2="{top + hgt}" stroke="#f59e0b" stroke-width="1.5"/>',
        f'<circle class="mrg-current" cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="#f59e0b" '
        f'stroke="white" stroke-width="1" data-slice="{current + 1}"/>',
        "</svg>",
    ]
    return "".join(parts)


def png_file(image: np.ndarray, folder: str | Path) -> str:
    """The image as a lossless PNG file in `folder` (named by its content, written once).

    Gradio would encode the array itself at PNG's default compression: ~60 ms for a 512² view
    on a 2-core CPU, on every load, overlay and slider change. Level 1 takes ~15 ms for a file
    ~10 % larger, and an image seen before (opacity slider moved back) is not encoded again."""
    from PIL import Image

    arr = np.ascontiguousarray(image)
    digest = hashlib.blake2b(arr.tobytes(), digest_size=16)
    digest.update(repr((arr.shape, arr.dtype.str)).encode())
    path = Path(folder) / f"view_{digest.hexdigest()}.png"
    if not path.is_file():
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
        Image.fromarray(arr).save(tmp, format="png", compress_level=1)
        os.replace(tmp, path)  # atomic: two sessions may render the same view at once
    return str(path)


def _windowed(view, preset, centre, width) -> np.ndarray:
    if view.meta.units != "HU" or preset in (None, "default"):
        return view.display
    if preset == "custom":
        c0, w0 = view.window or CT_WINDOWS["lung"]
        centre = c0 if centre is None else float(centre)
        width = w0 if width is None or float(width) <= 0 else float(width)
        return view.windowed(centre, width)
    return view.windowed(*CT_WINDOWS[preset])


def _is_ct(study) -> bool:
    return any(v.meta.units == "HU" for v in study.views)


# ----------------------------------------------------------------------------- draft

@dataclass
class StreamUpdate:
    editor: str | None  # new editor text, or None = leave the editor's text alone
    latest: str | None  # text for the read-only "Latest draft" box, or None = unchanged
    notice: str
    done: bool = False
    editor_locked: bool | None = None  # True/False = make the editor read-only/editable


KEPT_NOTICE = ("Your text in the editor was kept. The new draft is in **Latest draft** below; "
               "use *Replace editor with latest draft* if you want it.")
LOCKED_NOTICE = "Generating draft… the editor unlocks when it is done (or press Stop)."
UPDATE_EVERY_S = 0.06  # the page's streamed text: at most ~16 updates a second per draft
MAX_UPDATE_EVERY_S = 0.5  # ... and at least 2 a second, however many drafts run


def update_interval(engine: Engine, every_s: float) -> float:
    """Seconds between two updates of one streamed draft: `every_s` times the drafts running
    now, at most MAX_UPDATE_EVERY_S. Each update is a round of Python work for the web server,
    on the cores the drafts decode on: 8 drafts at 16 updates a second each made every draft
    10 s instead of 7 s (bench/app_load.py, 2 cores)."""
    if every_s <= 0:
        return every_s
    return min(max(every_s, MAX_UPDATE_EVERY_S), every_s * max(1, engine.drafts_running()))


def note_edit(session: Session, text: str) -> None:
    """The editor's input event (user keystrokes only): remember edits made during a stream."""
    if session.streaming and _norm(text) != _norm(session.editor_shadow):
        session.user_edited = True
        session.user_text = text


def request_stop(session: Session) -> None:
    session.stop_requested = True


def stream_draft(engine: Engine, session: Session, editor_text: str = "",
                 settings=None, update_every_s: float = 0.0, findings=None,
                 flips=()) -> Iterator[StreamUpdate]:
    """Stream a draft without ever overwriting the user's words.

    If the editor is empty or holds only model text, the draft streams into it and the editor
    is read-only meanwhile (so no keystroke can race a streamed piece). If the editor holds the
    user's own text, the draft streams into the read-only "Latest draft" box instead. Should an
    edit still arrive during a stream (note_edit), the stream leaves the editor at once.

    `findings` (finding names: the reader's chips, `flips` those they changed) conditions the
    draft on them (redraft_with_findings). The result edits the previous draft: only the
    clauses of the flipped chips change (Engine.follow_chips), and the user's own edits of the
    previous draft are kept in place (keep_user_edits). The editor keeps its text while the
    new clauses are written, then shows the edited draft.

    `update_every_s` coalesces pieces: the first piece is shown at once, later ones at most
    every `update_every_s` seconds, and the last update always carries the whole text (0 = one
    update per piece). The page uses UPDATE_EVERY_S: each update costs the server and the
    browser a round of work, while the eye cannot tell 15 updates a second from 400. With
    several drafts running the interval grows with their number (update_interval): the
    server's updates per second stay about those of one draft."""
    if session.study is None:
        yield StreamUpdate(None, None, "Load a study first.", done=True)
        return
    if engine.model is None:
        yield StreamUpdate(None, None, NO_MODEL, done=True)
        return
    try:
        engine.route(session.study)
    except NoModelForStudy as exc:
        yield StreamUpdate(None, None, f"**No draft:** {_md(str(exc))}", done=True)
        return
    into_editor = not (editor_text or "").strip() or _norm(editor_text) == _norm(
        session.editor_shadow)
    # A chip redraft always streams into the editor: the user's edits of the previous draft
    # are merged into the new one (keep_user_edits), never overwritten.
    previous, users, into_editor_at_start = session.draft, editor_text or "", into_editor
    into_editor = into_editor or findings is not None
    chips = getattr(session.analysis, "chips", ()) or ()
    previous_findings = ((session.draft_findings or {}).get("stated") if session.draft_findings
                         else [c.name for c in chips if c.predicted])
    previous_record = (session.draft, session.draft_findings, session.draft_settings,
                       session.draft_timings)

    def shown(draft: str) -> str:
        """What the editor shows: the draft, with the user's edits kept on a chip redraft."""
        if findings is None or into_editor_at_start:
            return draft
        return keep_user_edits(previous, users, draft)
    session.stream_count += 1
    me = session.stream_count
    session.streaming, session.stop_requested, session.user_edited = True, False, False
    session.latest = ""
    session.grounding, session.grounded = None, None  # of the previous draft
    text, t0, first, n = "", time.perf_counter(), None, 0
    sent, last_sent, finished = "", 0.0, False  # the text the page was last sent, and when
    try:
        pieces = engine.stream_report(session.study, settings,
                                      **({} if findings is None else {"findings": findings}))
    except ValueError as exc:  # findings this model does not state
        session.streaming = False
        yield StreamUpdate(None, None, f"**No draft:** {_md(str(exc))}", done=True)
        return
    stopped = False
    try:
        if into_editor:
            # a chip redraft edits the text in the editor, which stays until the edit is made
            session.editor_shadow = users if findings is not None or not into_editor_at_start \
                else ""
            yield StreamUpdate(session.editor_shadow, None, LOCKED_NOTICE, editor_locked=True)
        else:
            yield StreamUpdate(None, "", f"Generating draft… {KEPT_NOTICE}")
        for piece in pieces:
            if session.stop_requested or session.stream_count != me:
                stopped = True
                break
            text += piece
            n += 1
            now = time.perf_counter()
            first = first or now - t0
            if into_editor and session.user_edited:
                into_editor = False  # the user's text wins; the draft moves to the side box
                session.latest = sent = text
                last_sent = now
                yield StreamUpdate(None, text, f"Generating draft… {KEPT_NOTICE}",
                                   editor_locked=False)
                continue
            if n > 1 and now - last_sent < update_interval(engine, update_every_s):
                continue  # coalesced: shown with a later piece or the final update
            sent, last_sent = text, now
            if findings is not None and into_editor:  # the edit is made from the whole draft
                yield StreamUpdate(None, None, f"Redrafting with these findings… "
                                               f"{len(text.split())} words written")
            elif into_editor:
                session.editor_shadow = shown(text)
                yield StreamUpdate(session.editor_shadow, None, LOCKED_NOTICE)
            else:
                session.latest = text
                yield StreamUpdate(None, text, f"Generating draft… {KEPT_NOTICE}")
        if findings is not None and not stopped:
            text = engine.follow_chips(session.study, text, findings, previous or "",
                                       previous_findings)
        finished = True
    except Exception as exc:
        log_failure("draft generation", exc)
        yield StreamUpdate(None, None, "**The draft could not be generated.** Any text in the "
                                       "editor is kept; you can write the report by hand.",
                           done=True, editor_locked=False)
        return
    finally:
        pieces.close()  # ends the engine's decode (and frees the model) at once on Stop / cancel
        if session.stream_count == me:
            session.streaming = False
            # Closed mid-stream (the page cancelled it): the draft is what the page was sent.
            session.draft, session.draft_settings = (text if finished else sent), settings
            session.draft_findings = None if findings is None else {
                "stated": list(findings), "flipped": list(flips)}
            session.draft_timings = {"generate_s": round(time.perf_counter() - t0, 3),
                                     "first_piece_s": round(first or 0.0, 3), "pieces": n}
            if findings is not None and (stopped or not finished):  # no edit was made
                (session.draft, session.draft_findings, session.draft_settings,
                 session.draft_timings) = previous_record
    if session.stream_count != me:
        return  # a newer draft owns the editor and the notice now: no last word from this one
    state = "stopped" if stopped else "ready"
    log.info("draft %s: %d words in %.1f s", state, len(text.split()),
             session.draft_timings["generate_s"])  # never the text itself
    where = "in the editor" if into_editor else "in Latest draft (your text was kept)"
    if findings is not None and not into_editor_at_start and into_editor:
        where = "in the editor, with your own edits kept"
    if stopped and findings is not None and into_editor:
        session.editor_shadow = users
        yield StreamUpdate(users, None, "Redraft stopped: the editor is as it was.", done=True,
                           editor_locked=False)
        return
    if stopped and not text.strip():  # nothing was written: no "0 words in 0.1 s"
        yield StreamUpdate(None, None, "Draft stopped before the model wrote anything. "
                                       "Generate again, or write the report by hand.",
                           done=True, editor_locked=False)
        return
    # The final update always carries the whole text (pieces not shown yet included): an API
    # client (gradio_client's predict) sees only this last message.
    editor = latest = None
    if into_editor:
        session.editor_shadow = editor = shown(text)
    else:
        session.latest = latest = text
    yield StreamUpdate(editor, latest, f"Draft {state} {where}: {len(text.split())} words in "
                                       f"{session.draft_timings['generate_s']:.1f} s. Review "
                                       "and edit it, then Save.", done=True, editor_locked=False)


def stop_message(session: Session) -> str:
    """Stop button: the running stream ends at its next piece and unlocks the editor."""
    request_stop(session)
    return "Draft stopped. The text so far is kept: edit it, or Generate again."


def regenerate_settings(session: Session):
    """Regenerate = sample a different draft (a new seed each time); Generate stays greedy."""
    from mrg_core.models import GenerationSettings  # a plain dataclass

    return GenerationSettings(do_sample=True, temperature=0.8, top_p=0.9,
                              seed=session.stream_count + 1)


def take_latest(session: Session) -> str:
    """The user asked to replace the editor with the latest draft."""
    session.editor_shadow = session.latest or session.draft
    return session.editor_shadow


def _norm(text: str | None) -> str:
    return (text or "").replace("\r\n", "\n").strip()


# ----------------------------------------------------------------------------- save + history

@dataclass
class SaveOutcome:
    ok: bool
    message: str  # Markdown


def save(engine: Engine, session: Session, final_text: str, reviewer: str,
         ticked=None) -> SaveOutcome:
    """Save the editor text as a review of the current draft. Never touches the editor.

    A reviewer is required (with sign-in, layout.py passes the login). The draft saved
    unchanged is recorded as "accepted as drafted", not as a correction. `ticked`: the
    finding chips as the page shows them, kept with the correction (and the flips among
    them) for fine-tuning."""
    if session.study is None:
        return SaveOutcome(False, "**Not saved.** Load a study first.")
    if not (reviewer or "").strip():
        return SaveOutcome(False, f"**Not saved.** {REVIEWER_REQUIRED}")
    if session.streaming and not session.stop_requested:
        return SaveOutcome(False, "**Not saved.** A draft is still being generated; press Stop "
                                  "or wait for it to finish, then Save.")
    try:
        findings, flips = _chip_state(session, ticked)
    except ValueError as exc:
        return SaveOutcome(False, f"**Not saved.** {_md(str(exc))}")
    draft = engine.draft_record(session.draft, session.analysis, session.draft_settings,
                                session.draft_timings, findings=session.draft_findings)
    try:
        result = engine.save(session.study, draft, final_text or "", reviewer or "",
                             findings=findings, finding_flips=flips or None)
    except (InvalidCorrection, StoreError) as exc:
        return SaveOutcome(False, f"**Not saved.** {_md(exc.message)}")
    except Exception as exc:
        log_failure("saving", exc)
        return SaveOutcome(False, "**Not saved.** Something went wrong while saving. Your text "
                                  "was not lost — copy it and try Save again.")
    session.last_save, session.saved_text = result, final_text or ""
    kind = getattr(result, "kind", None)
    log.info("saved review #%s, %s (model %s %s)", result.correction_id, kind,
             draft.model_name, draft.model_version)
    when = result.created_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    if kind == ACCEPTED:
        return SaveOutcome(True, f"Saved #{result.correction_id}, accepted as drafted "
                                 f"({when}): the draft was saved unchanged, so it counts as "
                                 "an acceptance, not as a correction.")
    return SaveOutcome(True, f"Saved as correction #{result.correction_id} ({when}).")


def history_markdown(engine: Engine, session: Session, max_diffs: int = 5) -> str:
    """The study's saved versions, newest first, each with its draft → final diff."""
    if session.study is None:
        return "No study loaded."
    try:
        entries = engine.history(session.study)
    except StoreError as exc:
        return f"History unavailable: {_md(exc.message)}"
    if not entries:
        return "No saved versions of this study yet."
    rows = ["| # | saved (UTC) | reviewer | kind | model | probability |",
            "|---|---|---|---|---|---|"]
    for e in entries:
        prob = "–" if e.probability is None else f"{e.probability:.2f}"
        rows.append(f"| {e.correction_id} | {e.created_at:%Y-%m-%d %H:%M:%S} | "
                    f"{_md(e.reviewer)} | {KIND_LABELS.get(e.kind, e.kind)} | "
                    f"{_md(e.model_version)} | {prob} |")
    parts = ["\n".join(rows)]
    for e in entries[:max_diffs]:
        what = "Accepted as drafted" if e.kind == ACCEPTED else "Correction"
        parts.append(f"**{what} #{e.correction_id}** — model draft → saved report")
        if e.finding_flips:  # the chips the reviewer changed from the model's prediction
            parts.append("Findings changed by the reviewer: " + ", ".join(
                f"{_md(n)} → {'present' if (e.findings or {}).get(n) else 'absent'}"
                for n in e.finding_flips))
        parts.append(_fenced(diff_text(e.draft_text, e.final_text)))
    return "\n\n".join(parts)


def diff_text(draft: str, final: str) -> str:
    """Word-level diff of the model draft → the saved report: unchanged words as they are,
    removed words as [-…-], added words as {+…+} (the markup of `git diff --word-diff`).
    Line breaks of the saved report are kept, so a one-word edit shows that word only."""
    if not (draft or "").strip():
        return "(no model draft: written by hand)\n" + "\n".join(
            "{+" + line + "+}" if line.strip() else line for line in (final or "").splitlines())
    a, b = _words_and_breaks(draft), _words_and_breaks(final or "")
    if [w for w in a if w != "\n"] == [w for w in b if w != "\n"]:
        return "(saved unchanged: accepted as drafted)"
    out: list[str] = []
    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            out += b[j1:j2]
            continue
        old = [w for w in a[i1:i2] if w != "\n"]
        new = b[j1:j2]
        if old:
            out.append("[-" + " ".join(old) + "-]")
        if [w for w in new if w != "\n"]:
            out += _mark_added(new)
        else:
            out += new  # only line breaks were added
    return _join_words(out)


def _words_and_breaks(text: str) -> list[str]:
    """Words, with a "\n" token for each line break (diffed like a word)."""
    tokens: list[str] = []
    for i, line in enumerate(text.replace("\r\n", "\n").split("\n")):
        if i:
            tokens.append("\n")
        tokens += line.split()
    return tokens


def _mark_added(tokens: list[str]) -> list[str]:
    """{+words+} per line: a marker never spans a line break."""
    out, run = [], []
    for t in tokens + ["\n"]:
        if t == "\n":
            if run:
                out.append("{+" + " ".join(run) + "+}")
                run = []
            out.append("\n")
        else:
            run.append(t)
    return out[:-1]


def _join_words(tokens: list[str]) -> str:
    lines, cur = [], []
    for t in tokens:
        if t == "\n":
            lines.append(" ".join(cur))
            cur = []
        else:
            cur.append(t)
    lines.append(" ".join(cur))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- export

def export_files(engine: Engine, session: Session, final_text: str, reviewer: str,
                 folder: str | Path) -> tuple[list[str], str]:
    """Write the report as .txt, .json, FHIR .json and DICOM SR (.sr.dcm); returns (paths,
    message). The SR stands alone (new UIDs, empty patient module): the page keeps no DICOM
    UID, so linking it to the source study is the CLI's `report --sr-dir`.

    The session's earlier export files are deleted first; the new ones are named after the
    study and the session (two tabs on one study never share a file) and are remembered with
    the study and text they hold, so the page can tell when they go stale (exports_stale)."""
    clear_exports(session)
    if session.study is None:
        return [], "Load a study first."
    if not (final_text or "").strip():
        return [], "The report is empty: nothing to export."
    if session.streaming and not session.stop_requested:
        return [], ("A draft is still being generated; press Stop or wait for it to finish, "
                    "then prepare the export files.")
    a = session.analysis
    # the model that read this study (routing: not always the primary one)
    model_info = a.model if a is not None and a.model else engine.model_info
    common = dict(probability=None if a is None else a.probability,
                  threshold=None if a is None else a.threshold,
                  model_info=model_info, study_summary=session.study.summary())
    # "final" only for the text that was saved: a later edit or draft is not signed off yet
    save = session.last_save if _norm(session.saved_text) == _norm(final_text) else None
    effective = save.created_at if save is not None else None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"report_{session.study.content_hash[:10]}_{session.id}"
    txt, js, fhir = folder / f"{stem}.txt", folder / f"{stem}.json", folder / f"{stem}.fhir.json"
    sr = folder / f"{stem}.sr.dcm"
    # Remembered before writing, so a half-written set is deleted by the next clear as well.
    session.export_paths = [str(txt), str(js), str(fhir), str(sr)]
    session.export_key = (session.study.content_hash, final_text)
    txt.write_text(report_export.to_text(final_text, effective=effective, reviewer=reviewer,
                                         **common), encoding="utf-8")
    js.write_text(report_export.to_json(final_text, effective=effective, reviewer=reviewer,
                                        draft_text=session.draft, **common), encoding="utf-8")
    status = "final" if save is not None else "preliminary"
    fhir.write_text(report_export.json.dumps(report_export.to_fhir_diagnostic_report(
        final_text, status=status, effective=effective, **common), indent=2,
        ensure_ascii=False), encoding="utf-8")
    report_sr.to_dicom_sr(final_text, probability=common["probability"],
                          threshold=common["threshold"], model_info=model_info,
                          final=save is not None, reviewer=reviewer or None,
                          effective=effective).save_as(sr)
    note = "" if save is not None else " (not saved yet: FHIR status 'preliminary')"
    return list(session.export_paths), f"Export files ready{note}."


def clear_exports(session: Session) -> None:
    """Forget the session's export files and delete them: called whenever the study, the draft
    or the model changes, so a download can never carry another study's report."""
    for p in session.export_paths:
        Path(p).unlink(missing_ok=True)
    session.export_paths, session.export_key = [], None


def exports_stale(session: Session, text: str) -> bool:
    """True when export files are prepared but hold another study or text than the page's."""
    if session.export_key is None:
        return False
    study = None if session.study is None else session.study.content_hash
    return session.export_key != (study, text)


# ----------------------------------------------------------------------------- small helpers

def log_failure(what: str, exc: BaseException) -> None:
    """Log where it failed (exception type + code frames), never the message: a decoder's or
    database's message can quote header values, file names or report text."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("unexpected %s error during %s\n%s", type(exc).__name__, what, frames.rstrip())


def _name(source) -> str:
    if isinstance(source, tuple):
        return str(source[0])
    if isinstance(source, (bytes, bytearray)):
        return "uploaded file"
    return Path(str(source)).name


def _md(text) -> str:
    """Escape user/model text for a Markdown table or paragraph."""
    s = html.escape(str(text), quote=False)
    for ch in "\\`*_|[]#":
        s = s.replace(ch, "\\" + ch)
    return s.replace("\n", " ")


def _fenced(text: str, lang: str = "") -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}{lang}\n{text}\n{fence}"
