"""`Store`: the append-only correction store (SQLite by default, any SQLAlchemy URL works).

Every public write is one transaction: all of it is on disk, or none of it (and the caller gets
`StoreUnavailable` / `InvalidCorrection`, keeps the text and may retry).
"""
from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from sqlalchemy import distinct, func, inspect, select
from sqlalchemy import text as sql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..study import Study
from .engine import WRITE, make_engine, translate_errors
from .errors import InvalidCorrection
from .images import decode_png, encode_png
from .models import Base, CorrectionRow, DraftRow, StudyRow, ViewRow, utcnow
from .records import (ACCEPTED, CorrectionExample, DraftRecord, HistoryEntry, SaveResult,
                      review_kind)

MAX_TEXT_CHARS = 20_000  # a long CT report is ~5k; more is a paste accident, not a report
MAX_NAME_CHARS = 200
# corrections columns newer than the first release, in the order they were added (_migrate)
ADDED_COLUMNS = ("kind", "findings", "finding_flips")
REVIEWER_REQUIRED = ("Enter the reviewer's name before saving: every saved report records who "
                     "reviewed it. Your text was not lost.")


class Store:
    def __init__(self, url: str = "sqlite:///mrg_studio.db", busy_timeout_s: float = 5.0):
        self.engine = make_engine(url, busy_timeout_s)
        # Same pool and events; only marks transactions as writes (SQLite: BEGIN IMMEDIATE).
        self._write_engine = self.engine.execution_options(**{WRITE: True})
        self._schema_ready = False
        self._schema_lock = threading.Lock()

    # ---------------------------------------------------------------- writes

    def save_review(self, study: Study, draft: DraftRecord, final_text: str, reviewer: str,
                    label: int | None = None, findings: dict[str, int] | None = None,
                    finding_flips: list[str] | None = None) -> SaveResult:
        """Study (get-or-create) + views + draft + correction in ONE transaction.

        The row's kind says what the review was (records.review_kind): the draft saved
        unchanged is ACCEPTED ("accepted as drafted"), not a correction. A blank reviewer is
        refused (InvalidCorrection). `findings` ({label name: 0/1}) and `finding_flips` are
        the reader's finding chips (mrg_core.finding_chips)."""
        final_text, reviewer, label = _check_correction(final_text, reviewer, label)
        findings, finding_flips = _check_findings(findings, finding_flips)
        _check_draft(draft)
        views = _encode_views(study)
        with self._write() as s:
            study_id = self._get_or_create_study(s, study, views)
            d = _draft_row(study_id, draft)
            s.add(d)
            s.flush()
            c = CorrectionRow(draft_id=d.id, study_id=study_id, final_text=final_text,
                              reviewer=reviewer, label=label,
                              kind=review_kind(d.text, final_text), findings=findings,
                              finding_flips=finding_flips, created_at=utcnow())
            s.add(c)
            s.flush()
            result = SaveResult(study_id, d.id, c.id, c.created_at, c.kind)
        return result  # only returned once the `with` block has committed

    def save_draft(self, study: Study, draft: DraftRecord) -> int:
        """Keep a draft that has no correction (yet)."""
        _check_draft(draft)
        views = _encode_views(study)
        with self._write() as s:
            d = _draft_row(self._get_or_create_study(s, study, views), draft)
            s.add(d)
            s.flush()
            draft_id = d.id
        return draft_id

    def save_correction(self, draft_id: int, final_text: str, reviewer: str,
                        label: int | None = None, findings: dict[str, int] | None = None,
                        finding_flips: list[str] | None = None) -> int:
        final_text, reviewer, label = _check_correction(final_text, reviewer, label)
        findings, finding_flips = _check_findings(findings, finding_flips)
        with self._write() as s:
            row = s.execute(select(DraftRow.study_id, DraftRow.text)
                            .where(DraftRow.id == draft_id)).first()
            if row is None:
                raise InvalidCorrection(f"The draft this report belongs to (#{draft_id}) is not "
                                        "in the database; generate the draft again.")
            c = CorrectionRow(draft_id=draft_id, study_id=row.study_id, final_text=final_text,
                              reviewer=reviewer, label=label,
                              kind=review_kind(row.text, final_text), findings=findings,
                              finding_flips=finding_flips, created_at=utcnow())
            s.add(c)
            s.flush()
            correction_id = c.id
        return correction_id

    # ---------------------------------------------------------------- reads

    def history(self, content_hash: str) -> list[HistoryEntry]:
        """Corrections of one study, newest first."""
        q = (select(CorrectionRow, DraftRow)
             .join(DraftRow, CorrectionRow.draft_id == DraftRow.id)
             .join(StudyRow, CorrectionRow.study_id == StudyRow.id)
             .where(StudyRow.content_hash == content_hash)
             .order_by(CorrectionRow.created_at.desc(), CorrectionRow.id.desc()))
        with self._read() as s:
            return [HistoryEntry(c.id, c.created_at, c.reviewer, c.final_text, d.text,
                                 d.model_version, d.probability, c.label, _kind(c, d),
                                 c.finding_flips or [], c.findings)
                    for c, d in s.execute(q).all()]

    def get_study_images(self, content_hash: str) -> list[np.ndarray]:
        """The stored display images (uint8) in view order; [] for an unknown study."""
        with self._read() as s:
            pngs = s.scalars(select(ViewRow.png).join(StudyRow)
                             .where(StudyRow.content_hash == content_hash)
                             .order_by(ViewRow.index)).all()
        return [decode_png(p) for p in pngs]

    def iter_corrections(self) -> list[CorrectionExample]:
        """Every saved review with its images, oldest first, for fine-tuning; `kind` tells
        corrections from drafts accepted unchanged (finetune.select_corrections)."""
        out: list[CorrectionExample] = []
        images: dict[int, list[np.ndarray]] = {}
        for c, d, h, pngs in self._correction_rows():
            if c.study_id not in images:
                images[c.study_id] = [decode_png(p) for p in pngs]
            out.append(CorrectionExample(c.id, h, images[c.study_id], c.final_text,
                                         _label(c, d), d.text, d.model_version, d.probability,
                                         c.created_at, _kind(c, d), d.model_name,
                                         _reviewed_findings(c)))
        return out

    def export_pairs(self, folder: str | os.PathLike) -> int:
        """Write images/<hash>_<i>.png and corrections.jsonl; returns the number of lines.

        The reviewer's name is left out on purpose: it is personal data about staff, a training
        set does not need it, and exports travel further than the database does.

        Every saved review is written, each with its "kind": "corrected" (the reviewer edited
        the draft), "written" (no draft) or "accepted" (the draft saved unchanged). Accepted
        drafts are confirmed positives but hold no edit, and their target is the model's own
        output: data.load_corrections leaves them out unless asked (include_accepted=True),
        as finetune does.
        """
        folder = Path(folder)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        lines: list[str] = []
        written: set[int] = set()
        for c, d, h, pngs in self._correction_rows():
            rel = [f"images/{h}_{i}.png" for i in range(len(pngs))]
            if c.study_id not in written:  # stored PNG bytes are copied as is, no re-encode
                for path, png in zip(rel, pngs):
                    (folder / path).write_bytes(png)
                written.add(c.study_id)
            lines.append(json.dumps({
                "id": c.id, "image_path": rel, "report": c.final_text, "label": _label(c, d),
                "kind": _kind(c, d), "findings": c.findings, "finding_flips": c.finding_flips,
                "draft": d.text, "probability": d.probability, "model_version": d.model_version,
                "created_at": c.created_at.isoformat()}, ensure_ascii=False))
        # Write-then-rename: a reader never sees a half-written JSONL.
        tmp = folder / "corrections.jsonl.tmp"
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, folder / "corrections.jsonl")
        return len(lines)

    def stats(self) -> dict:
        with self._read() as s:
            def count(col):
                return s.scalar(select(func.count(col))) or 0
            return {
                "studies": count(StudyRow.id),
                "views": count(ViewRow.study_id),
                "drafts": count(DraftRow.id),
                "corrections": count(CorrectionRow.id),
                "accepted": s.scalar(select(func.count(CorrectionRow.id))
                                     .where(CorrectionRow.kind == ACCEPTED)) or 0,
                "labelled": count(CorrectionRow.label),
                "reviewers": count(distinct(CorrectionRow.reviewer)),
                "url": self.engine.url.render_as_string(hide_password=True),
            }

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- internals

    def _write(self):
        return self._session(self._write_engine)

    def _read(self):
        return self._session(self.engine)

    @contextmanager
    def _session(self, engine) -> Iterator[Session]:
        """One transaction: committed on normal exit, rolled back on any exception; database
        errors come out as StoreUnavailable (after the rollback)."""
        self._ensure_schema()
        with translate_errors(), Session(engine, expire_on_commit=False) as s, s.begin():
            yield s

    def _ensure_schema(self) -> None:
        """Create tables on first use (not in __init__: the app must start even while the
        database is down; the next Save then retries this)."""
        if self._schema_ready:
            return
        with self._schema_lock, translate_errors():
            if not self._schema_ready:
                try:
                    Base.metadata.create_all(self._write_engine)
                except Exception:
                    # Another process created the tables between check and create.
                    if not set(Base.metadata.tables) <= set(inspect(self.engine).get_table_names()):
                        raise
                self._migrate()
                self._schema_ready = True

    def _migrate(self) -> None:
        """Columns added after the first release, added to older database files in place
        (ADD COLUMN, nullable: old rows stay as they were; the append-only rule holds)."""
        for name in ADDED_COLUMNS:
            have = {c["name"] for c in inspect(self.engine).get_columns("corrections")}
            if name in have:
                continue
            column = CorrectionRow.__table__.c[name]
            kind = column.type.compile(dialect=self.engine.dialect)
            try:
                with self._write_engine.begin() as conn:
                    conn.execute(sql(f"ALTER TABLE corrections ADD COLUMN {name} {kind}"))
            except Exception:
                # Another process added it first.
                have = {c["name"] for c in inspect(self.engine).get_columns("corrections")}
                if name not in have:
                    raise

    @staticmethod
    def _get_or_create_study(s: Session, study: Study, views: list[ViewRow]) -> int:
        q = select(StudyRow.id).where(StudyRow.content_hash == study.content_hash)
        found = s.scalar(q)
        if found is not None:
            return found  # pixels already stored: append-only, never rewritten
        row = StudyRow(content_hash=study.content_hash, modality=study.modality,
                       body_part=study.body_part, n_views=len(study.views), created_at=utcnow())
        row.views = views
        try:
            with s.begin_nested():  # savepoint: a lost race must not undo the outer transaction
                s.add(row)
        except IntegrityError:
            found = s.scalar(q)  # the concurrent writer's row (now committed)
            if found is None:
                raise
            return found
        return row.id

    def _correction_rows(self):
        q = (select(CorrectionRow, DraftRow, StudyRow.content_hash)
             .join(DraftRow, CorrectionRow.draft_id == DraftRow.id)
             .join(StudyRow, CorrectionRow.study_id == StudyRow.id)
             .order_by(CorrectionRow.id))
        with self._read() as s:
            rows = s.execute(q).all()
            study_ids = {c.study_id for c, _, _ in rows}
            pngs: dict[int, list[bytes]] = {sid: [] for sid in study_ids}
            if study_ids:
                for sid, png in s.execute(select(ViewRow.study_id, ViewRow.png)
                                          .where(ViewRow.study_id.in_(study_ids))
                                          .order_by(ViewRow.study_id, ViewRow.index)):
                    pngs[sid].append(png)
        return [(c, d, h, pngs[c.study_id]) for c, d, h in rows]


# -------------------------------------------------------------------- validation and mapping

def _clean(text: str) -> str:
    # NUL is never typed on purpose, and PostgreSQL rejects it in text columns.
    return text.replace("\x00", "")


def _check_correction(final_text, reviewer, label) -> tuple[str, str, int | None]:
    if not isinstance(final_text, str) or not final_text.strip():
        raise InvalidCorrection("The report is empty. Write or keep the report text, then Save.")
    final_text = _clean(final_text)
    if len(final_text) > MAX_TEXT_CHARS:
        raise InvalidCorrection(f"The report is too long to save ({len(final_text):,} "
                                f"characters; the limit is {MAX_TEXT_CHARS:,}).")
    reviewer = _clean(reviewer or "").strip()
    if not reviewer:
        raise InvalidCorrection(REVIEWER_REQUIRED)
    if len(reviewer) > MAX_NAME_CHARS:
        raise InvalidCorrection(f"The reviewer name is too long (limit {MAX_NAME_CHARS}).")
    if label is not None:
        if isinstance(label, bool) or label in (0, 1):
            label = int(label)
        else:
            raise InvalidCorrection(f"The label must be 0 (normal) or 1 (abnormal), not {label!r}.")
    return final_text, reviewer, label


def _check_findings(findings, flips) -> tuple[dict | None, list | None]:
    """The reader's finding chips: {name: 0/1}, and flips that are names among them."""
    if findings is None:
        if flips:
            raise InvalidCorrection("Finding flips were given without the findings' states.")
        return None, None
    if not isinstance(findings, dict) or not all(
            isinstance(k, str) and k and len(k) <= MAX_NAME_CHARS for k in findings):
        raise InvalidCorrection("The findings must map finding names to 0 or 1.")
    out = {}
    for k, v in findings.items():
        if isinstance(v, bool) or v in (0, 1):
            out[_clean(k)] = int(v)
        else:
            raise InvalidCorrection(f"The finding {k!r} must be 0 (absent) or 1 (present), "
                                    f"not {v!r}.")
    flips = list(flips or [])
    if not set(flips) <= set(out):
        raise InvalidCorrection("A flipped finding is not among the findings' states.")
    return out, flips


def _check_draft(draft: DraftRecord) -> None:
    if not isinstance(draft.text, str) or len(draft.text) > MAX_TEXT_CHARS:
        raise InvalidCorrection("The model draft is missing or too long to save.")
    for name in ("probability", "threshold"):
        v = getattr(draft, name)
        if v is not None and not math.isfinite(float(v)):
            raise InvalidCorrection(f"The model's {name} is not a number ({v!r}).")
    for name in ("settings", "timings"):
        try:  # allow_nan=False: PostgreSQL's JSON refuses NaN/Infinity
            json.dumps(getattr(draft, name), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidCorrection(f"The draft's {name} cannot be stored: {exc}") from exc


def _encode_views(study: Study) -> list[ViewRow]:
    # Outside the transaction: PNG encoding should not hold the database's write lock.
    return [ViewRow(index=i, png=encode_png(v.display), rows=int(v.display.shape[0]),
                    columns=int(v.display.shape[1]), meta=v.meta.to_dict())
            for i, v in enumerate(study.views)]


def _draft_row(study_id: int, draft: DraftRecord) -> DraftRow:
    def num(v):
        return None if v is None else float(v)
    return DraftRow(study_id=study_id, model_name=_clean(str(draft.model_name))[:MAX_NAME_CHARS],
                    model_version=_clean(str(draft.model_version))[:MAX_NAME_CHARS],
                    settings=dict(draft.settings), text=_clean(draft.text),
                    probability=num(draft.probability), threshold=num(draft.threshold),
                    timings=dict(draft.timings), created_at=utcnow())


def _kind(c: CorrectionRow, d: DraftRow) -> str:
    """The stored kind; rows saved before the column existed get it from their texts."""
    return c.kind or review_kind(d.text, c.final_text)


def _reviewed_findings(c: CorrectionRow) -> dict | None:
    """The chips as training targets only when the reviewer flipped one: then they looked at
    them and left the others as they were on purpose. Chips nobody touched are the model's
    own prediction, which would teach the finding heads their own mistakes."""
    return c.findings if c.finding_flips else None


def _label(c: CorrectionRow, d: DraftRow) -> int | None:
    if c.label is not None:
        return c.label
    if d.probability is not None and d.threshold is not None:
        return int(d.probability >= d.threshold)
    return None
