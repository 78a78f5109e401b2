"""The one facade the app, the CLI and the benchmarks call.

It owns the models (a primary one, and the others studies are routed to by what they look
like: mrg_core.routing) and one store, and turns files into analysed studies, drafts and saved
corrections. Nothing here knows about widgets; nothing in ui/ knows about torch or SQL.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mrg_core.finding_chips import finding_chips
from mrg_core.io import LoadLimits, load_studies, load_study
from mrg_core.model_thread import ModelThread, ProcessExiting, one_torch_thread, start_worker
from mrg_core.models.quantize import model_precision
from mrg_core.sections import findings_span, with_sections
from mrg_core.paths import DEFAULT_CXR_MODEL_DIR, DEFAULT_MODEL_DIR, REPO_ROOT
from mrg_core.storage import DraftRecord, SaveResult, Store
from mrg_core.storage.space import default_database_url, ephemeral_store_warning
from mrg_core.study import Study

log = logging.getLogger(__name__)


@dataclass
class EngineSettings:
    """Where the model and the database live. Every field has an environment variable."""

    model_dir: Path | None = DEFAULT_MODEL_DIR
    # SQLite in the repository; on a Hugging Face Space in its persistent /data when present
    database_url: str = field(default_factory=lambda: default_database_url(REPO_ROOT))
    device: str | None = None  # None = CUDA when present, else CPU
    limits: LoadLimits = field(default_factory=LoadLimits)
    # Further models the engine routes studies to by their card's trained_on (mrg_core.routing):
    # by default the shipped chest radiograph model. $MRG_EXTRA_MODELS: folders separated by
    # os.pathsep, "" for none.
    extra_model_dirs: tuple[Path, ...] = field(default_factory=lambda: tuple(
        p for p in (DEFAULT_CXR_MODEL_DIR,) if (p / "config.json").is_file()))
    # False: the primary model reads every study (warning when it is not what the model was
    # trained on) and extra_model_dirs is ignored; True: studies are routed, unreadable ones
    # refused (Engine: extra_models)
    route: bool = True
    precision: str = "fp32"  # the LM for drafts: fp32, fp32-merged, bf16, int8, int8-/int4-weights
    # (models/quantize; the app and the report CLI default to int8-weights)
    # torch threads of the model thread (analysis, drafts): None = what the creating thread
    # uses, "auto" = every core torch uses, a number = that many
    decode_threads: int | str | None = None

    @classmethod
    def from_env(cls) -> EngineSettings:
        s = cls()
        if os.environ.get("MRG_MODEL_DIR"):
            s.model_dir = Path(os.environ["MRG_MODEL_DIR"])
        if "MRG_EXTRA_MODELS" in os.environ:
            s.extra_model_dirs = tuple(Path(p) for p in
                                       os.environ["MRG_EXTRA_MODELS"].split(os.pathsep) if p)
        if os.environ.get("MRG_DB_URL"):
            s.database_url = os.environ["MRG_DB_URL"]
        if os.environ.get("MRG_DEVICE"):
            s.device = os.environ["MRG_DEVICE"]
        if os.environ.get("MRG_PRECISION"):
            s.precision = os.environ["MRG_PRECISION"]
        if os.environ.get("MRG_DECODE_THREADS"):
            v = os.environ["MRG_DECODE_THREADS"]
            s.decode_threads = v if v.strip().lower() == "auto" else int(v)
        return s


@dataclass
class Analysis:
    """What the page shows before any text: probability, saliency, and whether to trust it."""

    probability: float
    threshold: float
    label: int
    labels: dict[str, float]
    heatmaps: list[np.ndarray]
    domain_warning: str | None
    seconds: float
    findings: tuple[str, ...] = ()  # in words, what the draft states (finding_prompt models)
    # every finding the draft can state, with its probability, for the reader to flip
    chips: tuple = ()  # finding_chips.FindingChip
    # Studies of several slices/views: each view's probability (shown scale), the rule that
    # combined them, and the key views (most probable first); Grad-CAM is computed for the
    # first key view at once and for any other view on demand (Engine.view_heatmap).
    view_probabilities: tuple[float, ...] | None = None
    aggregation: str | None = None
    key_views: tuple[int, ...] = ()
    # what the study looks like (mrg_core.domain.Domain.to_dict): from DICOM tags or pixels
    domain: dict | None = None
    label_meaning: str = ""  # what the probability is of, in words (the model's card)
    # the model that read the study (its info) and, in words, why it was chosen
    model: dict | None = None
    routing: str = ""


def _sub_study(study: Study, index: int) -> Study:
    return Study(views=(study.views[index],))


class _Bounded(dict):
    """A dict that forgets its oldest entries past `size` (insertion order)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def __setitem__(self, key, value):
        self.pop(key, None)
        super().__setitem__(key, value)
        while len(self) > self.size:
            del self[next(iter(self))]


class ModelNotLoaded(RuntimeError):
    """Raised when a model call is made while no model is loaded."""


class NoModelForStudy(ModelNotLoaded):
    """A study no loaded model reads (mrg_core.routing): refused, its message says why."""


_END = object()  # end of a background decode
_UNSET = object()  # Engine.route: the study's domain not worked out yet
# How long a draft keeps the model before others may take a turn: short enough that an analysis
# never waits long behind a draft, long enough that the hand-overs cost little (a 135M LLM step
# is ~80 ms on 2 cores, so it yields after every step; the shipped GPT-2 after ~35 tokens).
DECODE_SLICE_S = 0.05


@dataclass
class _Failed:
    exc: BaseException


def resolve_threads(n: int | str | None) -> int | None:
    """The model thread's torch thread count as a number: "auto" = every core torch uses.
    Until 2026-12-01 "auto" was cores − 1, when every session's thread had its own OpenMP
    team; with all model work on one thread, 2 threads beat 1 on 2 cores in the app at 1 and
    8 users (1.5 vs 1.8 s, 6.8 vs 8.6 s; README, Speed)."""
    if n is None:
        return None
    if isinstance(n, str) and n.strip().lower() == "auto":
        import torch

        return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
    return int(n)


def parse_threads(value) -> int | str:
    """A thread flag's value: "auto" (see resolve_threads) or a positive number. ValueError
    otherwise. Used by app.py --decode-threads and the report CLI's --threads."""
    if str(value).strip().lower() == "auto":
        return "auto"
    n = int(value)
    if n < 1:
        raise ValueError("the thread count must be 1 or more, or auto")
    return n


def domain_warning(info: dict | None, study: Study, seen=None) -> str | None:
    """Plain words when the study is not what the model (its `info`) was trained on. `seen`:
    the study's mrg_core.domain.Domain when the caller has it already (else worked out here)."""
    if info is None:
        return None
    trained = info.get("trained_on", {}) or {}
    if not isinstance(trained, dict):
        return None
    from mrg_core.domain import dicom_kind, study_domain

    want_mod, want_part = trained.get("modality"), trained.get("body_part")
    problems = []
    mod = study.modality
    # CR and DX are both projection radiographs: a CR-trained model reads DX alike
    if want_mod and mod and mod.upper() != want_mod.upper() and (
            dicom_kind(mod, None) != dicom_kind(want_mod, None)):
        problems.append(f"this study is {mod}, the model was trained on {want_mod} only")
    part = study.body_part
    if want_part and part and part.upper() != want_part.upper():
        problems.append(f"body part is {part}, the model was trained on {want_part} only")
    if want_mod and mod is None:  # a PNG / JPEG: its pixels say what it is
        what = trained.get("description", "see the model card")
        seen = seen if seen is not None else study_domain(study)
        if seen is None:
            problems.append(f"the image has no DICOM modality; the model expects {want_mod} "
                            f"({what})")
        elif seen.kind != dicom_kind(want_mod, want_part):
            problems.append(f"this image looks like {seen.describe()}; the model was trained "
                            f"on {want_mod} only ({what})")
    if not problems:
        return None
    return ("Out of domain: " + "; ".join(problems) +
            ". The probability and draft below are unreliable for this study.")


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op thread count set to `n` inside the block (None: left alone)."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Engine:
    def __init__(self, model, store: Store, limits: LoadLimits | None = None,
                 precision: str = "fp32", decode_threads: int | str | None = None,
                 extra_models: Sequence | None = None, runner: ModelThread | None = None):
        """`model`: the primary model (fine-tuning and the model switch act on it).
        `extra_models`: None = `model` reads every study, with a warning when the study is
        not what it was trained on; a list (maybe empty) = studies are routed by domain to
        `model` or one of these, and a study none of them reads is refused (mrg_core.routing).
        `runner`: the thread the models were loaded on (from_settings), else a new one.
        """
        self.store = store
        self.limits = limits or LoadLimits()
        self.precision = precision
        self.decode_threads = resolve_threads(decode_threads)
        # Every model computation runs on this one thread, in arrival order (model_thread.py):
        # one OpenMP team for the process, and another user's analysis waits for one decode
        # step, not for a whole draft.
        self.model_thread = runner or ModelThread(self.decode_threads)
        self.model = self.model_thread.run(self._with_precision, model)
        self.routed = extra_models is not None
        self.extra_models = [self.model_thread.run(self._with_precision, m)
                             for m in extra_models or ()]
        self._routes: dict = _Bounded(256)  # study content hash -> (model, Domain)
        self.missing_weights: str | None = None  # why the configured model could not load
        # shown on the page when a Space keeps the corrections where a restart wipes them
        self.store_warning = None if store is None else ephemeral_store_warning(store.engine.url)
        self._batchers: dict = {}  # id(model) -> (model, its StepBatcher or None)
        self._batchers_lock = threading.Lock()
        self._drafts_running = 0  # decode threads alive (Stop ends one within a token)
        self._drafts_lock = threading.Lock()
        # study content hash -> (study decision, key view) of multi-view studies, for drafts
        self._decisions: dict = _Bounded(256)

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> Engine:
        from mrg_core.weights import MissingWeights

        from mrg_core.models import ReportModel

        missing = []

        def load(folder):
            t0 = time.perf_counter()
            try:
                m = ReportModel.from_pretrained(folder, device=settings.device)
            except MissingWeights as exc:  # e.g. the LLM package was not installed
                missing.append(str(exc))
                log.error("the model in %s cannot load: %s", Path(folder).name, exc)
                return None
            log.info("model %s loaded in %.2f s", Path(folder).name, time.perf_counter() - t0)
            return m

        runner = ModelThread(resolve_threads(settings.decode_threads))  # loads there too
        model = None
        if settings.model_dir is not None and (Path(settings.model_dir) / "config.json").is_file():
            model = runner.run(load, settings.model_dir)
        else:
            log.warning("no model found at %s: the app runs without drafts", settings.model_dir)
        extras = [m for m in (runner.run(load, d) for d in settings.extra_model_dirs
                              if Path(d).resolve() != Path(settings.model_dir or "").resolve())
                  if m is not None] if settings.route else None
        engine = cls(model, Store(settings.database_url), settings.limits,
                     precision=settings.precision, decode_threads=settings.decode_threads,
                     extra_models=extras, runner=runner)
        engine.missing_weights = "; ".join(missing) or None
        if model is not None:  # fine-tunes start from this folder, named by its lineage
            engine.model_dir = Path(settings.model_dir).resolve()
        return engine

    def _with_precision(self, model):
        """The model with the engine's inference precision applied (fp32: unchanged)."""
        from mrg_core.models.quantize import CPU_ONLY, apply_precision, check_precision

        self.precision = check_precision(self.precision)
        if model is None or self.precision == "fp32":
            return model
        precision = self.precision
        if precision in CPU_ONLY and model.device.type != "cpu":
            log.warning("%s is a CPU form: the model on %s decodes in bf16", precision,
                        model.device.type)
            precision = "bf16"
        t0 = time.perf_counter()
        apply_precision(model, precision)
        log.info("language model set to %s in %.2f s", precision, time.perf_counter() - t0)
        return model

    def warm_up(self) -> float:
        """One small analysis, overlay and draft on a synthetic image, so that the first user
        does not pay the one-off costs (lazy imports, first kernel calls: ~0.7 s on a 2-core
        CPU). Nothing is stored. Returns the seconds it took."""
        if not self.models:
            return 0.0
        from mrg_core.models import GenerationSettings
        from mrg_core.study import study_from_arrays

        t0 = time.perf_counter()
        pixels = np.random.default_rng(0).integers(0, 256, (256, 256)).astype(np.uint8)
        study = study_from_arrays([pixels])
        def warm(model):
            _pred, maps = model.analyze(study)
            for _ in model.stream_report(study, GenerationSettings(max_new_tokens=4)):
                pass
            return maps

        for model in self.models:  # each directly: noise is no study any model would be routed
            self.overlay(study.views[0].display, self.model_thread.run(warm, model)[0])
        from mrg_core.domain import study_domain
        self.model_thread.run(study_domain, study)  # the pixel classifier's first call, too
        return time.perf_counter() - t0

    def seed_drafts(self, paths: Sequence[str | Path]) -> int:
        """Draft each of these studies (the bundled samples) that a loaded model reads, through
        the users' path (each decode step a shared model-thread job, so a user who arrives
        meanwhile waits one step at most). Speculative decoding's proposals (DraftNgrams) then
        know the model's house style before the first user drafts; without them the first
        drafts decode about one token per pass (README, Speed). Nothing is stored. Returns the
        number of drafts made."""
        from mrg_core.io import StudyLoadError

        made = 0
        for path in paths:
            try:
                study = self.load([str(path)])
                for _ in self.stream_report(study):
                    pass
            except (StudyLoadError, ModelNotLoaded):  # a sample no loaded model reads
                continue
            made += 1
        return made

    # ----- model information -------------------------------------------------------------
    @property
    def model_info(self) -> dict | None:
        return None if self.model is None else dict(self.model.info)

    def _require_model(self):
        if self.model is None:
            raise ModelNotLoaded("No model is loaded: studies can be viewed and reports written "
                                 "by hand, but no probability or draft can be made.")
        return self.model

    # ----- studies ----------------------------------------------------------------------------
    def load(self, sources: Sequence) -> Study:
        """Files → Study. Raises mrg_core.io.StudyLoadError with a readable message."""
        return load_study(list(sources), self.limits)

    def load_series(self, sources: Sequence) -> list[Study]:
        """Files, folders or zips → one Study per DICOM series (SeriesInfo says which)."""
        return load_studies(list(sources), self.limits)

    @property
    def models(self) -> list:
        """Every loaded model, the primary first."""
        return [m for m in (self.model, *self.extra_models) if m is not None]

    def route(self, study: Study, seen=_UNSET):
        """(the model that reads `study`, its mrg_core.domain.Domain). Routed engines pick by
        domain and raise NoModelForStudy when no model reads it; a single-model engine always
        answers its model. `seen`: the study's Domain when the caller has it already."""
        hit = self._routes.get(study.content_hash)
        if hit is not None:
            return hit
        from mrg_core.domain import study_domain

        models = self.models
        if not models:
            self._require_model()
        if seen is _UNSET:
            seen = self.model_thread.run(study_domain, study)
        if self.routed:
            from mrg_core import routing

            model = routing.choose(models, seen)
            if model is None:
                raise NoModelForStudy(routing.refusal(models, seen))
        else:
            model = models[0]
        self._routes[study.content_hash] = (model, seen)
        return model, seen

    def domain_warning(self, study: Study, seen=None) -> str | None:
        """Plain words when the study is not what its model was trained on; a routed study
        no model reads gets the refusal."""
        try:
            model, seen = self.route(study) if seen is None else self.route(study, seen)
        except NoModelForStudy as exc:
            return str(exc)
        except ModelNotLoaded:
            return None
        return domain_warning(dict(model.info), study, seen)

    def _analysis(self, model, seen, **kw) -> Analysis:
        from mrg_core.routing import routing_line

        info = dict(model.info)
        return Analysis(domain=None if seen is None else seen.to_dict(),
                        label_meaning=model.config.label_meaning, model=info,
                        routing=routing_line(seen, info) if self.routed else "", **kw)

    def analyze(self, study: Study) -> Analysis:
        """Probability, Grad-CAM and findings from the model that reads this study. Raises
        NoModelForStudy when it is routed and no model reads it."""
        t0 = time.perf_counter()
        model, seen = self.route(study)  # the domain once: routing, warning and Analysis
        if len(study.views) > 1:
            return self._analyze_views(model, study, t0, seen)
        pred, maps = self.model_thread.run(model.analyze, study)
        return self._analysis(
            model, seen, probability=float(pred.probability), threshold=float(pred.threshold),
            label=int(pred.label), labels=dict(pred.labels), heatmaps=maps,
            domain_warning=domain_warning(dict(model.info), study, seen),
            seconds=time.perf_counter() - t0,
            findings=tuple(model.config.finding_phrases[n] for n in pred.findings),
            chips=finding_chips(model, pred.labels, pred.findings))

    def _analyze_views(self, model, study: Study, t0: float, seen) -> Analysis:
        """A series or a multi-view study: every view classified on its own, combined by the
        model's study rule; Grad-CAM and findings from the key (most probable) view."""
        from mrg_core.study_level import key_views

        def read():
            raw = model.view_probabilities(study)
            keys = key_views(raw)
            return raw, model.study_decision(raw), keys, model.analyze(_sub_study(study, keys[0]))

        raw, (p_raw, label), keys, (pred, maps) = self.model_thread.run(read)
        cfg = model.config
        t = cfg.study_threshold if cfg.study_threshold is not None else cfg.threshold
        self._decisions[(study.content_hash, id(model))] = (label, keys[0])
        heatmaps: list = [None] * len(study.views)
        heatmaps[keys[0]] = maps[0]
        shown = model.calibrated(p_raw)
        labels = dict(pred.labels)
        labels[cfg.labels[model._target_index]] = shown
        findings = pred.findings if pred.label == label else ()
        return self._analysis(
            model, seen, probability=shown, threshold=model.calibrated(t), label=label,
            labels=labels, heatmaps=heatmaps,
            domain_warning=domain_warning(dict(model.info), study, seen),
            seconds=time.perf_counter() - t0,
            findings=tuple(cfg.finding_phrases[n] for n in findings),
            chips=finding_chips(model, pred.labels, findings),
            view_probabilities=tuple(model.calibrated(float(x)) for x in raw),
            aggregation=cfg.study_aggregation, key_views=keys)

    def view_heatmap(self, study: Study, index: int) -> np.ndarray:
        """Grad-CAM of one view of a multi-view study, on demand (the viewer's slider)."""
        model = self.route(study)[0]
        return self.model_thread.run(model.analyze, _sub_study(study, index))[1][0]

    def drafted_study(self, study: Study) -> tuple[Study, int | None]:
        """(what the draft is written from, the decision it states): a single view as it is; a
        series or multi-view study from its key view with the whole study's decision."""
        _index, drafted, decision = self._drafted(study)
        return drafted, decision

    def follow_chips(self, study: Study, text: str, findings, previous: str,
                     previous_findings) -> str:
        """A chip redraft as an edit of the draft the radiologist had: `previous` (written
        with the chips `previous_findings`) with the clauses of flipped chips changed, new
        ones taken from `text` (the draft written with the chips `findings`), the rest word
        for word (finding_chips.follow_chips); the Impression is `text`'s. `text` itself when
        there is no previous draft or the model states no findings."""
        from mrg_core.evaluation.clinical import LOBE_NAMES
        from mrg_core.finding_chips import follow_chips

        model, previous = self.route(study)[0], previous or ""
        a, b = findings_span(model, text)
        pa, pb = findings_span(model, previous)
        if not model.finding_names or not previous[pa:pb].strip():
            return text
        names = model.finding_names
        edited = follow_chips(previous[pa:pb], previous_findings, text[a:b], findings, names,
                              model.config.finding_phrases,
                              [n for n in names if n not in LOBE_NAMES])
        return text[:a] + edited + text[b:]

    def _drafted(self, study: Study) -> tuple[int, Study, int | None]:
        """drafted_study, with the index of the view it is."""
        if len(study.views) == 1:
            return 0, study, None
        key = (study.content_hash, id(self.route(study)[0]))
        hit = self._decisions.get(key)
        if hit is None:
            self.analyze(study)
            hit = self._decisions[key]
        label, index = hit
        return index, _sub_study(study, index), label

    def ground(self, study: Study, text: str, findings=None):
        """Where each statement of `text` (the draft, or the radiologist's edit of it) comes
        from in the image the draft is written from: (view index, [GroundedStatement]). A
        series or multi-view study is grounded on its key view, with the study's decision, as
        its draft is written (`findings`: the reader's chips, as stream_report).
        Raises grounding.NoGrounding when the routed model's text does not see the image."""
        from mrg_core.grounding import ground_sentences

        model = self.route(study)[0]
        index, drafted, decision = self._drafted(study)
        a, b = findings_span(model, text)  # what the LM wrote: not a decision's Impression
        found = ground_sentences(model, drafted, text[a:b], decision=decision,
                                 findings=findings, run=self.model_thread.run)
        for g in found:  # spans in `text`
            g.start, g.end = g.start + a, g.end + a
        return index, found

    def _batcher(self, model):
        """The StepBatcher of `model` (made on first use), or None where it cannot batch."""
        with self._batchers_lock:  # one per model, even when drafts start together
            hit = self._batchers.get(id(model))
            if hit is None or hit[0] is not model:
                live = {id(m) for m in self.models}
                self._batchers = {k: v for k, v in self._batchers.items() if k in live}
                hit = self._batchers[id(model)] = (
                    model, self.model_thread.run(model.step_batcher, self.model_thread.run))
            return hit[1]

    def drafts_running(self) -> int:
        """Drafts whose decode has not ended yet (a closed stream ends within a token)."""
        return self._drafts_running

    def stream_report(self, study: Study, settings=None, findings=None) -> Iterator[str]:
        """Yield text pieces as they are decoded; concatenated they are the draft.
        `findings` (finding label names): the reader's finding chips in place of the model's
        predicted findings, which the draft then states.

        The decode runs in its own thread and its model work on the model thread, shared
        with other users' drafts where it can: a slow consumer (a web page receiving updates)
        never keeps other users' drafts waiting. Closing this iterator (Stop) ends the decode
        within one token."""
        from mrg_core.models import GenerationSettings

        model = self.route(study)[0]
        settings = settings or GenerationSettings()
        drafted, decision = self.drafted_study(study)
        if findings is not None:
            findings = model.chosen_findings(findings)  # refused here, not in the thread
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()

        # a series: its key view, with the series' decision
        extra = {} if decision is None else {"decision": decision}
        if findings is not None:
            extra["findings"] = findings
        batcher = self._batcher(model) if settings.num_beams == 1 else None
        if batcher is not None:
            extra["batcher"] = batcher

        def batched(it) -> None:
            # This thread runs the draft's own search (token choice, guidance, text) with one
            # torch thread; its prefill and steps are model-thread jobs, each step shared with
            # every other draft decoding now (models/step_batcher.py).
            one_torch_thread()
            self.model_thread.run(model.encode, drafted)  # features cached: the draft reuses them
            for piece in it:
                pieces.put(piece)
                if stop.is_set():
                    break

        def sliced(it) -> None:
            # A draft that cannot share steps (beam search, GPT-2, a peft wrapper) runs on the
            # model thread in time slices (DECODE_SLICE_S, at least one step): another user's
            # analysis or draft runs in between instead of waiting for this draft to end.
            def advance() -> bool:
                until = time.perf_counter() + DECODE_SLICE_S
                while not stop.is_set():
                    piece = next(it, _END)
                    if piece is _END:
                        return True
                    pieces.put(piece)
                    if time.perf_counter() >= until:
                        break
                return False

            while not stop.is_set() and not self.model_thread.run(advance):
                pass

        def decode() -> None:
            it = with_sections(model, model.stream_report(drafted, settings, **extra), drafted,
                               decision)
            try:
                (batched if batcher is not None else sliced)(it)
            except BaseException as exc:  # handed to the consumer, raised there
                pieces.put(_Failed(exc))
            finally:
                try:  # a batched draft gives its rows back; a sliced one closes on the model
                    it.close() if batcher is not None else self.model_thread.run(it.close)
                except ProcessExiting:  # nothing left to close for
                    pass
                finally:
                    pieces.put(_END)
                    with self._drafts_lock:
                        self._drafts_running -= 1

        with self._drafts_lock:
            self._drafts_running += 1
        start_worker(decode, "mrg-decode")
        try:
            while (item := pieces.get()) is not _END:
                if isinstance(item, _Failed):
                    raise item.exc
                yield item
        finally:
            stop.set()

    def draft_record(self, text: str, analysis: Analysis | None, settings=None,
                     timings: dict | None = None, findings: dict | None = None) -> DraftRecord:
        """What the store keeps about a draft: who made it, how, and what it said;
        `findings`: the reader's chips it was written from ({"stated", "flipped"})."""
        info = (analysis.model if analysis is not None and analysis.model else
                self.model_info) or {"name": "none", "version": "none"}
        kept = {} if settings is None else dict(vars(settings))
        if self.model is not None and model_precision(self.model) != "fp32":
            # a draft made by a changed LM says so: the form it ran in (bf16 for int8 on a GPU)
            kept["precision"] = model_precision(self.model)
        if findings is not None:
            kept["findings"] = dict(findings)
        return DraftRecord(
            model_name=str(info.get("name")), model_version=str(info.get("version")),
            text=text,
            probability=None if analysis is None else analysis.probability,
            threshold=None if analysis is None else analysis.threshold,
            settings=kept, timings=timings or {})

    # ----- corrections -----------------------------------------------------------------------
    def save(self, study: Study, draft: DraftRecord, final_text: str, reviewer: str,
             label: int | None = None, findings: dict[str, int] | None = None,
             finding_flips: list[str] | None = None) -> SaveResult:
        """One transaction; raises storage.InvalidCorrection or storage.StoreUnavailable.
        `findings`: the reader's finding chips ({name: 0/1}), `finding_flips` the ones they
        changed from the model's prediction."""
        return self.store.save_review(study, draft, final_text, reviewer, label=label,
                                      findings=findings, finding_flips=finding_flips)

    def history(self, study: Study):
        return self.store.history(study.content_hash)

    # ----- added for ui/ (UI owner): the overlay picture for the viewer ----------------------
    @staticmethod
    def overlay(display: np.ndarray, heatmap: np.ndarray, opacity: float = 0.4) -> np.ndarray:
        """Grey uint8 view + Grad-CAM map in [0, 1] → RGB uint8 (see mrg_core.explain)."""
        from mrg_core.explain import overlay

        return overlay(display, heatmap, opacity)

    # ----- model versions (finetune) --------------------------------------------------------
    # Admin actions: list versions on disk, switch the live model, fine-tune a new version from
    # the stored corrections. draft_record() already stamps every draft with name + version.
    model_dir: Path | None = None  # folder of the live model, when known (switch_model sets it)

    def list_models(self, roots: list[Path] | None = None) -> list:
        """list[registry.ModelVersion] under the default model folder and the models folder."""
        from mrg_core.registry import list_model_versions

        return list_model_versions(roots)

    def switch_model(self, path) -> dict:
        """Load the version in `path` and make it the live model; returns its info."""
        from mrg_core.models import ReportModel

        path = Path(path)
        device = None if self.model is None else self.model.device
        model = ReportModel.from_pretrained(path, device=device)  # outside the lock: drafts go on
        model = self._with_precision(model)
        def swap():  # after the model jobs already waiting
            self.model, self.model_dir = model, path.resolve()
            self._routes.clear()  # studies routed to the old model go to the new one

        self.model_thread.run(swap)
        return dict(model.info)

    def finetune(self, out_dir=None, cfg=None):
        """Fine-tune the live model on every stored correction -> finetune.FinetuneResult.
        Takes minutes: call it from a worker thread. The live model is not switched."""
        from mrg_core.finetune import finetune_from_store

        model = self._require_model()
        base = self.model_dir
        if base is None:  # loaded by from_settings: find its folder by name + version
            info = model.info
            base = next((m.path for m in self.list_models()
                         if (m.name, m.version) == (info["name"], info["version"])), None)
        if base is None and self.precision != "fp32":
            raise RuntimeError(f"the live model runs in {self.precision} and its folder is "
                               "unknown: fine-tuning needs the fp32 model folder")
        others = {m.config.name for m in self.extra_models} - {model.config.name}
        return finetune_from_store(self.store, base if base is not None else model, out_dir, cfg,
                                   exclude_models=others)
