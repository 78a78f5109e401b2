"""Caption metrics with pycocoevalcap 1.2 (the literature's reference code).

Text is normalised with text.clean_report (R2Gen practice) instead of the Java PTB tokenizer, so
references and hypotheses are cleaned the same way everywhere. METEOR starts a JVM (~6 s), so a
CaptionScorer keeps one METEOR process and scores each system's whole split in one call.
CIDEr's document frequencies come from the evaluated set: tiny sets give meaningless CIDEr.
"""
from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence

from ..text import clean_report

METRIC_NAMES = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
_EMPTY = "<empty>"  # an empty hypothesis breaks METEOR's line protocol; this token matches nothing


def require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("METEOR needs Java, which is not installed: install a JRE, e.g. "
                           "`apt-get install -y openjdk-17-jre-headless` (add it to .ci/run), "
                           "or call caption_metrics(..., meteor=False).")
    return java


def _prepare(refs: Mapping[str, str | Sequence[str]], hyps: Mapping[str, str]
             ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Cleaned {id: [refs]} / {id: [hyp]} over ids that have a hypothesis and a non-empty ref."""
    gts, res = {}, {}
    for key, ref in refs.items():
        if key not in hyps:
            continue
        ref_list = [ref] if isinstance(ref, str) else list(ref)
        ref_list = [c for c in (clean_report(r) for r in ref_list) if c]
        if not ref_list:
            continue
        gts[key] = ref_list
        res[key] = [clean_report(hyps[key]) or _EMPTY]
    return gts, res


class CaptionScorer:
    """Reusable scorer: one METEOR JVM for several systems. Use as a context manager."""

    def __init__(self, meteor: bool = True):
        self._meteor = None
        if meteor:
            require_java()
            from pycocoevalcap.meteor.meteor import Meteor

            self._meteor = Meteor()

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._meteor is not None:
            self._meteor.__del__()  # stops the JVM now; running it again at GC is harmless
            self._meteor = None

    def score(self, refs: Mapping[str, str | Sequence[str]], hyps: Mapping[str, str],
              per_example: bool = False) -> dict:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        gts, res = _prepare(refs, hyps)
        out: dict = {"n": len(gts)}
        if not gts:
            return out | {k: float("nan") for k in METRIC_NAMES}
        bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
        for i, b in enumerate(bleu, 1):
            out[f"BLEU_{i}"] = float(b)
        each = {"BLEU_4": bleu_each[3]}
        if self._meteor is not None:
            m, m_each = self._meteor.compute_score(gts, res)
            out["METEOR"], each["METEOR"] = float(m), m_each
        out["ROUGE_L"], each["ROUGE_L"] = Rouge().compute_score(gts, res)
        out["ROUGE_L"] = float(out["ROUGE_L"])
        cider, cider_each = Cider().compute_score(gts, res)
        out["CIDEr"], each["CIDEr"] = float(cider), list(map(float, cider_each))
        if per_example:
            keys = list(gts)
            out["per_example"] = {k: {m: float(v[i]) for m, v in each.items()}
                                  for i, k in enumerate(keys)}
        return out


def caption_metrics(refs: Mapping[str, str | Sequence[str]], hyps: Mapping[str, str],
                    meteor: bool = True) -> dict:
    """BLEU_1..4, METEOR, ROUGE_L, CIDEr (+ n, the number of scored ids).

    refs: {id: text or [texts]}; hyps: {id: text}. Ids without a hypothesis or with an empty
    reference are skipped. One METEOR call for the whole set.
    """
    with CaptionScorer(meteor=meteor) as scorer:
        return scorer.score(refs, hyps)
