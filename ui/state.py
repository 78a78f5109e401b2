"""Per-browser-session state, kept in one gr.State (the same object is handed to every event of a
session, so the stream generator sees edits recorded by the editor's input event)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Session:
    study: Any = None  # mrg_core.study.Study
    analysis: Any = None  # mrg_core.engine.Analysis
    study_label: str = ""  # what the user loaded (file names), for messages and export names
    # The DICOM series of the last upload when it held several (each a Study); `study` is the
    # one chosen in the page's Series menu (series_index). Empty for a one-study upload.
    series: list = field(default_factory=list)
    series_index: int = 0
    upload_label: str = ""  # the upload's file names, which every series of it shares

    # The model's latest draft (complete, or cut short by Stop) and how it was made.
    draft: str = ""
    draft_settings: Any = None
    draft_timings: dict = field(default_factory=dict)
    # a draft written from the reader's finding chips: {"stated": names, "flipped": names}
    draft_findings: dict | None = None
    # Sentence grounding of the latest draft: (view index, [grounding.GroundedStatement]) and
    # the statement whose map the viewer shows (None: the decision's Grad-CAM).
    grounding: Any = None
    grounded: int | None = None
    stream_count: int = 0  # drafts started; a stream stops when a newer one starts

    # Editor ownership: what the app last wrote into the editor. Any other editor text is the
    # user's and is never overwritten by a stream.
    editor_shadow: str = ""
    streaming: bool = False
    stop_requested: bool = False
    user_edited: bool = False  # the user typed while a draft was streaming into the editor
    user_text: str = ""  # their text at the last keystroke
    latest: str = ""  # a draft that went to the "Latest draft" box instead of the editor

    last_save: Any = None  # storage.SaveResult
    saved_text: str = ""  # the report text of last_save

    # Export files prepared by this session (handlers.export_files) and what they hold:
    # (study content_hash, report text). Files of another study or text are stale.
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # in its export file names
    export_paths: list = field(default_factory=list)
    export_key: tuple | None = None

    def reset_study(self, study, label: str) -> None:
        """A new study: forget everything tied to the previous one. The page clears the editor
        and the export files too (handlers.clear_exports), so one study's report can never be
        saved or exported against another."""
        self.study, self.analysis, self.study_label = study, None, label  # series: kept
        self.draft, self.draft_settings, self.draft_timings = "", None, {}
        self.draft_findings = None
        self.grounding, self.grounded = None, None
        self.latest, self.last_save, self.editor_shadow = "", None, ""
        self.saved_text = ""
        self.stream_count += 1  # an unfinished stream of the old study stops
