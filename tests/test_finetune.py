"""Learning from expert corrections, end to end on real parts: a tiny model pretrained here on an
"original" report style, a reviewer who always rewrites one sentence, the real Store on a real
SQLite file, finetune_from_store, and the new version reloaded from its folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import numpy as np
import pytest
import torch

from mrg_core.data.synthetic import synthetic_image
from mrg_core.finetune import FinetuneConfig, finetune_from_store, token_f1
from mrg_core.models import ReportModel, tiny_model
from mrg_core.registry import list_model_versions
from mrg_core.storage import DraftRecord, Store
from mrg_core.study import study_from_arrays
from mrg_core.text import clean_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Image kind -> the finding sentence of the original style; every report ends with TEMPLATE.
FINDINGS = {"normal": "both lungs are well aerated .",
            "opacity": "ground glass opacity in the right lower lobe ."}
TEMPLATE = "no pleural effusion ."
REVIEWER = "the pleural spaces are clear ."  # what the reviewer always writes instead
KINDS = list(FINDINGS)


def original(kind: str) -> str:
    return f"{FINDINGS[kind]} {TEMPLATE}"


def reviewed(kind: str) -> str:
    return f"{FINDINGS[kind]} {REVIEWER}"


def make_image(kind: str, rng: np.random.Generator) -> np.ndarray:
    return synthetic_image(int(kind != "normal"), "right", "lower", rng, size=64)


def studies(n: int, seed: int) -> list[tuple[str, object]]:
    """n (kind, Study) pairs, kinds in rotation, pixels from `seed` (distinct sets never share
    a study: the noise differs)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        out.append((kind, study_from_arrays([make_image(kind, rng)], "CT", "CHEST")))
    return out


def has_reviewer_wording(text: str) -> bool:
    return "pleural spaces are clear" in clean_report(text)


def finding_correct(text: str, kind: str) -> bool:
    return clean_report(text).startswith(FINDINGS[kind])


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """The parent version: tiny_model (prompt method, frozen LM) pretrained on the original style.
    The tokenizer knows both wordings; the LM never saw the reviewer's."""
    torch.manual_seed(0)
    texts = [original(k) for k in KINDS] + [reviewed(k) for k in KINDS]
    model = tiny_model(texts=texts, seed=0)
    built = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)  # a random frozen LM learns nothing: pretrain it once here
    data = studies(36, seed=100)
    from mrg_core.preprocess import study_to_tensor
    from mrg_core.training import LossModule, collate

    items = [(study_to_tensor(s, model.config.preprocess), original(k), float(k != "normal"))
             for k, s in data]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_module = LossModule(model)
    model.train()
    g = torch.Generator().manual_seed(0)
    for step in range(PRETRAIN_STEPS):
        idx = torch.randint(len(items), (8,), generator=g).tolist()
        pix, reports, labels = collate([items[i] for i in idx])
        loss = loss_module(pix, reports, labels)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for n, p in model.named_parameters():
        p.requires_grad_(built[n])
    model.config.version = "0.1.0"
    folder = tmp_path_factory.mktemp("models") / "base"
    model.save_pretrained(folder)
    return folder


PRETRAIN_STEPS = 60


@pytest.fixture(scope="session")
def store_url(tmp_path_factory, base_dir):
    """24 reviewed studies: drafts from the parent model, final text = the reviewer's wording."""
    db = tmp_path_factory.mktemp("db") / "corrections.db"
    url = f"sqlite:///{db}"
    base = ReportModel.from_pretrained(base_dir)
    with Store(url) as store:
        for kind, study in studies(24, seed=200):
            draft = base.generate_report(study)
            p = base.predict(study)
            rec = DraftRecord(model_name=base.config.name, model_version=base.config.version,
                              text=draft, probability=p.probability, threshold=p.threshold)
            store.save_review(study, rec, reviewed(kind), "dr-test", label=int(kind != "normal"))
    return url
