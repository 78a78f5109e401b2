"""SQLAlchemy 2 tables of the correction store.

Append-only by contract: rows are inserted, never updated or deleted. A study row is shared by
every draft of the same pixels (unique `content_hash`), so its views are stored once.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, DateTime, Float, ForeignKey, Integer, LargeBinary, SmallInteger,
                        String, Text, TypeDecorator)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on every backend (SQLite hands back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use UTC-aware datetimes")
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(
            timezone.utc)


class Base(DeclarativeBase):
    pass


class StudyRow(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    n_views: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    views: Mapped[list[ViewRow]] = relationship(order_by="ViewRow.index")


class ViewRow(Base):
    __tablename__ = "study_views"

    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    index: Mapped[int] = mapped_column("view_index", Integer, primary_key=True)
    png: Mapped[bytes] = mapped_column(LargeBinary)  # View.display only: de-identified pixels
    rows: Mapped[int] = mapped_column(Integer)
    columns: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict] = mapped_column(JSON)  # ViewMeta.to_dict(): non-identifying by contract


class DraftRow(Base):
    __tablename__ = "drafts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(200))
    settings: Mapped[dict] = mapped_column(JSON)
    text: Mapped[str] = mapped_column(Text)
    probability: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    timings: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class CorrectionRow(Base):
    __tablename__ = "corrections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    draft_id: Mapped[int] = mapped_column(ForeignKey("drafts.id"), index=True)
    # Denormalised from the draft so history/export need no extra join; always equal to it.
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    final_text: Mapped[str] = mapped_column(Text)
    reviewer: Mapped[str] = mapped_column(String(200))
    label: Mapped[int | None] = mapped_column(SmallInteger)  # reviewer-confirmed 0/1
    # "corrected" | "accepted" (draft saved unchanged) | "written" (no draft). NULL only in rows
    # of files made before the column existed (added by Store._ensure_schema); read as derived.
    kind: Mapped[str | None] = mapped_column(String(16))
    # The reader's finding chips when the page showed them: {label name: 0/1} for every finding
    # the model states, and the names they flipped from the model's prediction. NULL for a
    # model without chips, and in rows of files made before the columns existed.
    findings: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))
    finding_flips: Mapped[list | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
