"""Decoded, preprocessed image tensors kept in memory for training and evaluation.

Every file goes through the app's own path: mrg_core.io.load_study → view.display (uint8 grey)
→ preprocess.view_to_tensor. COV-CTR's shortcut (all COVID images are PNG, many non-COVID JPEG)
therefore meets one decode → grey → resize path, exactly as at inference time.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .example import Example

_PNG = b"\x89PNG\r\n\x1a\n"


def file_format(path: str | Path) -> str:
    """"png" | "jpeg" | "dicom" | "other", from the file's magic bytes (not its name)."""
    with open(path, "rb") as f:
        head = f.read(132)
    if head.startswith(_PNG):
        return "png"
    if head.startswith(b"\xff\xd8"):
        return "jpeg"
    if head[128:132] == b"DICM":
        return "dicom"
    return "other"


def is_png_only(example: Example) -> bool:
    """True when every file of the example is a PNG (the shortcut-free COV-CTR subset)."""
    return all(file_format(p) == "png" for p in example.image_paths)


class ImageCache:
    """Decodes each example's files once and keeps FloatTensor[V,1,S,S] per example id."""

    def __init__(self, preprocess_config=None, jpeg_quality: tuple[int, int] | None = None):
        """jpeg_quality=(lo, hi): keep each view re-encoded as JPEG at a quality in [lo, hi]
        fixed per example (preprocess.jpeg_roundtrip), for training augmentation."""
        from ..preprocess import PreprocessConfig

        self.cfg = preprocess_config or PreprocessConfig()
        self.jpeg_quality = jpeg_quality
        self._tensors: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._tensors)

    def load_study(self, example: Example):
        from ..io import load_study

        return load_study([str(p) for p in example.image_paths])

    def get(self, example: Example) -> torch.Tensor:
        t = self._tensors.get(example.id)
        if t is None:
            from ..preprocess import jpeg_roundtrip, view_to_tensor

            study = self.load_study(example)
            views = [v.display for v in study.views]
            if self.jpeg_quality:
                lo, hi = self.jpeg_quality
                q = lo + zlib.crc32(example.id.encode()) % (hi - lo + 1)
                views = [jpeg_roundtrip(v, q) for v in views]
            t = torch.stack([view_to_tensor(v, self.cfg) for v in views])
            self._tensors[example.id] = t
        return t

    def preload(self, examples: list[Example], desc: str = "decoding images") -> None:
        for ex in tqdm(examples, desc=desc, leave=False, disable=len(examples) < 50):
            self.get(ex)

    def batch(self, examples: list[Example], n_views: int | None = None) -> torch.Tensor:
        """FloatTensor[B,V,1,S,S]; studies with fewer views repeat their last view (so a
        1-view study contributes the same evidence twice rather than a black image)."""
        tensors = [self.get(ex) for ex in examples]
        v = n_views or max(t.shape[0] for t in tensors)
        out = []
        for t in tensors:
            if t.shape[0] < v:
                t = torch.cat([t, t[-1:].expand(v - t.shape[0], *t.shape[1:])])
            out.append(t[:v])
        return torch.stack(out)
