"""Does sentence grounding localise? A synthetic check with known answers (issue 21).

    python -m mrg_core.grounding_check --seeds 0 1 2 --steps 600

Synthetic 64-px "CT slices" (two dark lungs) carry up to two findings, each in one of four
places (upper/lower × image-left/right) drawn independently: a **nodule** (a bright disk) and
a **cavity** (a bright ring with a dark centre). The report has one sentence per finding
("nodule in the upper right lung .", radiological sides: the patient's right is image-left),
or "lungs are clear .". Both findings may sit on the same side, and each is present on its own
in half of the studies, so no sentence can be written from the other finding's place (the
shortcut an earlier two-finding design allowed).

A tiny MedVLM (the real model code: encoder, query transformer, GPT-2 LM) is trained on these
studies; then, on fresh studies with both findings in different places, each sentence of the
reference report is grounded (mrg_core.grounding.ground_sentences) and its map's peak must fall
in its own finding's quadrant. Reported: the share of sentences that do, per seed.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from mrg_core.study import study_from_arrays

PLACES = [("upper", "right", 0.3, 0.3), ("upper", "left", 0.3, 0.7),  # (lobe, side, row, col)
          ("lower", "right", 0.7, 0.3), ("lower", "left", 0.7, 0.7)]
SIZE = 64
YY, XX = np.mgrid[:SIZE, :SIZE]
# the two dark lungs, the same in every slice (drawn once: a tenth of a training step)
LUNGS = sum(40 * (((XX - cx) / (SIZE * 0.2)) ** 2 + ((YY - SIZE / 2) / (SIZE * 0.4)) ** 2 < 1)
            for cx in (SIZE * 0.3, SIZE * 0.7))


def _image(nodule: int | None, cavity: int | None, rng: np.random.Generator) -> np.ndarray:
    img = rng.normal(60, 10, (SIZE, SIZE)) - LUNGS
    for kind, place in (("nodule", nodule), ("cavity", cavity)):
        if place is None:
            continue
        _, _, r, c = PLACES[place]
        # jitter the spot within its quadrant
        cy = SIZE * (r + rng.uniform(-0.07, 0.07))
        cx = SIZE * (c + rng.uniform(-0.07, 0.07))
        d = np.hypot(YY - cy, XX - cx)
        if kind == "nodule":
            img += 150 * (d < SIZE * 0.07)
        else:
            img += 150 * ((d < SIZE * 0.1) & (d > SIZE * 0.06))
    return np.clip(img, 0, 255).astype(np.uint8)


def _report(nodule: int | None, cavity: int | None) -> str:
    parts = [f"{kind} in the {PLACES[p][0]} {PLACES[p][1]} lung ."
             for kind, p in (("nodule", nodule), ("cavity", cavity)) if p is not None]
    return " ".join(parts) or "lungs are clear ."


def draw(rng: np.random.Generator, both: bool = False) -> tuple[np.ndarray, str, tuple]:
    """One study: (image, report, (nodule place, cavity place)); `both`: two findings in two
    different places (the grounding test's studies)."""
    if both:
        nodule, cavity = rng.choice(4, 2, replace=False).tolist()
    else:
        nodule = int(rng.integers(4)) if rng.random() < 0.5 else None
        cavity = int(rng.integers(4)) if rng.random() < 0.5 else None
    return _image(nodule, cavity, rng), _report(nodule, cavity), (nodule, cavity)


def targets(places: tuple) -> list[float]:
    """[any finding, nodule in place 0..3, cavity in place 0..3]."""
    row = [float(any(p is not None for p in places))] + [0.0] * 8
    for k, p in enumerate(places):
        if p is not None:
            row[1 + 4 * k + p] = 1.0
    return row


def train_model(seed: int, steps: int, batch: int = 16, log=None, lr: float = 2e-3):
    from mrg_core.models import ReportModel
    from mrg_core.models.factory import tiny_config
    from mrg_core.preprocess import study_to_tensor
    from mrg_core.text import train_tokenizer

    cfg = tiny_config("medvlm", "gpt2")
    cfg.preprocess.image_size = SIZE
    # the image heads name each finding in each place, as the real model's finding and lobe
    # heads do: the visual features then carry where a finding is, not only that there is one
    cfg.labels = ["pneumonia"] + [f"{k}_{i}" for k in ("nodule", "cavity") for i in range(4)]
    cfg.max_report_tokens = 24
    words = [_report(n, c) for n in [None, *range(4)] for c in [None, *range(4)]]
    tok = train_tokenizer(words + [cfg.instruction], min_frequency=1)
    torch.manual_seed(seed)
    model = ReportModel.build(cfg, tok)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        items = [draw(rng) for _ in range(batch)]
        x = torch.stack([study_to_tensor(study_from_arrays([im]), cfg.preprocess)
                         for im, _, _ in items])
        y = torch.tensor([targets(places) for _, _, places in items])
        loss = model.compute_loss(x, [r for _, r, _ in items], y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and step % 100 == 0:
            log(f"seed {seed} step {step} loss {loss.item():.3f}")
    return model.eval()


def localisation(model, n: int = 40, seed: int = 1000) -> dict:
    """Share of the sentences whose map peaks in their own finding's quadrant, on `n` fresh
    studies with a nodule and a cavity in two different places."""
    from mrg_core.grounding import ground_sentences
    from mrg_core.text import clean_report

    rng = np.random.default_rng(seed)
    hits, total, written = 0, 0, 0
    for _ in range(n):
        img, report, places = draw(rng, both=True)
        study = study_from_arrays([img])
        written += int(clean_report(model.generate_report(study)) == clean_report(report))
        found = ground_sentences(model, study, report, lungs=False)
        for g, place in zip(found, places):
            _, _, r, c = PLACES[place]
            row, col = g.peak
            hits += int((row < 0.5) == (r < 0.5) and (col < 0.5) == (c < 0.5))
            total += 1
    # drafts_exact: the model's own draft is the reference word for word (it has learned
    # where the findings are: a map can only show what the model uses)
    return {"sentences": total, "in_own_quadrant": hits / max(total, 1),
            "drafts_exact": written / max(n, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--studies", type=int, default=40)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = {}
    for seed in args.seeds:
        model = train_model(seed, args.steps, log=lambda m: print(m, file=sys.stderr))
        out[seed] = localisation(model, args.studies)
        print(json.dumps({"seed": seed, **out[seed]}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "studies": args.studies, "seeds": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
