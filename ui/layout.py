"""The one page: widgets, and which handler each event calls. Logic lives in ui/handlers.py."""
from __future__ import annotations

import gradio as gr

from mrg_core.engine import Engine

from . import handlers as h
from . import models_panel as mp
from .file_access import FilePolicy, launch_options, private_dir
from .state import Session

# Drafts, redrafts and sentence maps that may run at once. The engine orders their model work
# itself (one model thread, arrival order) and overlapping drafts share decode steps, so more
# at once means bigger shared steps, not more CPU contention (bench/app_load.py).
MODEL_EVENTS = 16

CSS = """
#mrg-header h1 {margin: 0; font-size: 1.5rem;}
#mrg-header p {margin: 0.15rem 0 0; opacity: 0.8;}
.mrg-alert {border: 2px solid #b45309; background: #fef3c7; color: #78350f; border-radius: 8px;
            padding: 0.7rem 0.9rem; font-weight: 600;}
#probability {font-size: 1.15rem;}
#probability p {font-weight: 600;}
#probability {padding: 0.2rem 0.1rem;}
#history table {font-size: 0.9rem;}
#history pre, #history code {white-space: pre-wrap; word-break: break-word;}
#load-sample {align-self: stretch; min-height: 100%;}
/* The viewer fills its box at any image size, aspect ratio kept: a 64x64 study is scaled up
   (Gradio's own object-fit: scale-down shows it at native size), a large one scaled down,
   never cropped. An enlarged image (VIEWER_HEAD marks it) is drawn nearest-neighbour, crisp
   pixels rather than a blur; a reduced one keeps the browser's smoothing (Chromium applies
   `pixelated` to reductions too, and nearest-neighbour there drops rows and aliases). */
#viewer .image-frame {width: 100%; height: 100%; min-width: 0; min-height: 0;}
#viewer .image-frame img {width: 100%; height: 100%; object-fit: contain;}
#viewer .image-frame img[data-mrg-enlarged] {image-rendering: pixelated;}
/* Series viewer: the slice line and the probability plot under the image. */
#slice-info .mrg-slice-text {font-weight: 600; font-variant-numeric: tabular-nums;}
#slice-info svg.mrg-slice-plot {display: block; width: 100%; height: auto; max-height: 140px;}
#slice-info .mrg-slice-caption {font-size: 0.8rem; opacity: 0.75;}
"""


# Marks the viewer's image `data-mrg-enlarged` while it is drawn larger than its own pixels
# (on the screen's device pixels: object-fit contain's scale times devicePixelRatio), so that
# CSS above draws only enlargements nearest-neighbour. Checked when an image loads and
# whenever its box changes size (window, zoom, fullscreen).
VIEWER_HEAD = """<script>
(() => {
  const mark = (img) => {
    if (!img.naturalWidth || !img.naturalHeight) return;
    const box = img.getBoundingClientRect();
    const scale = Math.min(box.width / img.naturalWidth, box.height / img.naturalHeight);
    img.toggleAttribute("data-mrg-enlarged", scale * (window.devicePixelRatio || 1) > 1.001);
  };
  const resized = new ResizeObserver((entries) => entries.forEach((e) => mark(e.target)));
  document.addEventListener("load", (event) => {
    const img = event.target;
    if (img instanceof HTMLImageElement && img.closest("#viewer")) {
      mark(img);
      resized.observe(img);
    }
  }, true);
})();
</script>"""


def theme() -> gr.themes.Base:
    # System fonts only: nothing is fetched from the internet.
    return gr.themes.Soft(primary_hue="blue", neutral_hue="slate",
                          font=["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
                          font_mono=["ui-monospace", "Menlo", "Consolas", "monospace"])


def launch_kwargs(engine: Engine, files: FilePolicy | None = None) -> dict:
    """Options every launch of this page needs (app.py and the tests use them). `files`: caps
    and TTL of the upload folder (None: ui.file_access.FilePolicy.from_env); the launch gets
    the guard that scopes each file to its user and refuses uploads over the caps."""
    return {"css": CSS, "head": VIEWER_HEAD, "theme": theme(), "share": False,
            "max_file_size": engine.limits.max_file_bytes, "footer_links": [],
            **launch_options(engine.limits, files)}


def build_app(engine: Engine, auth=None, model_roots=None, admin_open: bool = False
              ) -> gr.Blocks:
    """`auth` (Gradio's auth callable) is applied at launch; here it makes the signed-in user
    the reviewer: shown in a locked box, and taken from the login on Save whatever the box says.
    Its `admins` (mrg_core.auth.load_auth) may use the Model panel's actions; without `auth`
    only `admin_open` opens them to every visitor (models_panel.admin_check).
    `model_roots`: where the Model panel looks for versions (None = registry defaults)."""
    # Inside Gradio's upload folder: Gradio serves these files as they are (no second copy),
    # only to the page they were sent to; deleted when it closes, by age, at stop (file_access)
    export_dir = private_dir("mrg_export_")
    view_dir = private_dir("mrg_views_")  # viewer PNGs (h.png_file)

    with gr.Blocks(title="MRG Studio", analytics_enabled=False) as demo:
        session = gr.State(_new_session)  # a callable: one fresh Session per browser tab

        gr.Markdown("# MRG Studio\nChest study → pneumonia probability, Grad-CAM and a draft "
                    "report for the radiologist to correct.", elem_id="mrg-header")
        model_info = gr.Markdown(h.model_info_markdown(engine), elem_id="model-info")

        with gr.Row(equal_height=False):
            # ------------------------------------------------------------ left: load + look
            with gr.Column(scale=5):
                with gr.Group():
                    files = gr.File(label="Study files (DICOM, PNG or JPEG; several = one "
                                          "study; a zip or several DICOM series too)",
                                    file_count="multiple", file_types=h.FILE_TYPES,
                                    height=120, elem_id="upload")
                    with gr.Row(equal_height=True):
                        samples = h.list_samples()
                        sample = gr.Dropdown(samples, value=samples[0][1] if samples else None,
                                             label="Synthetic sample study", scale=3,
                                             elem_id="sample")
                        sample_btn = gr.Button("Load sample", scale=1, elem_id="load-sample")
                load_msg = gr.Markdown(elem_id="load-message")
                series = gr.Dropdown([], value=None, label="Series", visible=False,
                                     interactive=True, elem_id="series")
                image = gr.Image(label="View", type="numpy", interactive=False, height=520,
                                 format="png", buttons=["fullscreen"], elem_id="viewer")
                view_idx = gr.Slider(1, 2, value=1, step=1, label="View / slice",
                                     visible=False, elem_id="view-index")
                # Where the viewer is in a series and each slice's probability (inline SVG):
                # rebuilt with each image, a few hundred bytes, no plotting library.
                slice_info = gr.HTML("", elem_id="slice-info", js_on_load=None)
                with gr.Row():
                    show_overlay = gr.Checkbox(True, label="Grad-CAM overlay", elem_id="overlay")
                    opacity = gr.Slider(0.0, 1.0, value=0.4, step=0.05, label="Overlay opacity")
                with gr.Group(visible=False) as ct_box:
                    preset = gr.Radio(h.WINDOW_PRESETS, value="default",
                                      label="CT window (default = the file's own window)")
                    with gr.Row(visible=False) as custom_row:
                        centre = gr.Number(-600, label="Window centre (HU)")
                        width = gr.Number(1500, label="Window width (HU)", minimum=1)

            # ------------------------------------------------------------ right: read + report
            with gr.Column(scale=5):
                warning = gr.HTML(visible=False, elem_id="domain-warning")
                probability = gr.Markdown(elem_id="probability")
                # The findings the draft states, with their probabilities: untick or tick one
                # and redraft; the draft follows the chips and the user's edits stay.
                with gr.Group(visible=False) as chips_box:
                    chips = gr.CheckboxGroup([], value=[], label="Findings the draft states "
                                             "(tick or untick, then redraft)",
                                             elem_id="finding-chips")
                    redraft_btn = gr.Button("Redraft with these findings", size="sm",
                                            elem_id="redraft")
                with gr.Row():
                    gen_btn = gr.Button("Generate draft", variant="primary", elem_id="generate")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                    regen_btn = gr.Button("Regenerate", elem_id="regenerate")
                notice = gr.Markdown(elem_id="draft-notice")
                editor = gr.Textbox(label="Report (editable)", lines=12, max_lines=30,
                                    interactive=True, autoscroll=False, elem_id="editor",
                                    placeholder="Generate a draft, or write the report here.")
                with gr.Group(visible=False) as latest_box:
                    latest = gr.Textbox(label="Latest draft (read-only; your text above was kept)",
                                        lines=6, interactive=False, elem_id="latest-draft")
                    use_latest = gr.Button("Replace editor with latest draft", size="sm")
                # Sentence grounding of the latest draft, on request (a few seconds on a CPU,
                # which other users' drafts would wait for): select a sentence and the viewer
                # shows where in the image its words come from.
                ground_btn = gr.Button("Show where each sentence comes from", size="sm",
                                       elem_id="ground")
                with gr.Group(visible=False) as ground_box:
                    grounded = gr.Radio([], value=None, label="Sentences of the draft",
                                        elem_id="grounded-sentences")
                    ground_msg = gr.Markdown(elem_id="grounding-note")
                with gr.Row():
                    reviewer = gr.Textbox(label="Reviewer" + (" (signed in)" if auth else ""),
                                          placeholder="Your name", scale=3,
                                          interactive=not auth, elem_id="reviewer")
                    save_btn = gr.Button("Save report", variant="primary", scale=1,
                                         elem_id="save")
                save_msg = gr.Markdown(elem_id="save-message")
                with gr.Accordion("Export", open=False):
                    export_btn = gr.Button("Prepare export files", size="sm", elem_id="export")
                    with gr.Row():
                        dl_txt = gr.DownloadButton("Text", visible=False, size="sm",
                                                   elem_id="download-txt")
                        dl_json = gr.DownloadButton("JSON", visible=False, size="sm",
                                                    elem_id="download-json")
                        dl_fhir = gr.DownloadButton("FHIR R4", visible=False, size="sm",
                                                    elem_id="download-fhir")
                        dl_sr = gr.DownloadButton("DICOM SR", visible=False, size="sm",
                                                  elem_id="download-sr")
                    export_msg = gr.Markdown(elem_id="export-message")
                with gr.Accordion("History of this study", open=True):
                    history = gr.Markdown("No study loaded.", elem_id="history")
                with gr.Accordion("Model (admin)", open=False, elem_id="model-admin"):
                    choices = mp.model_choices(engine, model_roots)
                    version = gr.Dropdown(choices, value=choices[0][1] if choices else None,
                                          label="Model versions on disk", elem_id="model-version")
                    with gr.Row():
                        use_btn = gr.Button("Use this model", size="sm", elem_id="use-model")
                        ft_btn = gr.Button("Fine-tune on saved corrections", size="sm",
                                           elem_id="finetune")
                    model_msg = gr.Markdown(
                        "" if auth or admin_open else mp.READ_ONLY_NOTE,
                        elem_id="model-message")

        # ---------------------------------------------------------------- wiring
        view_inputs = [session, view_idx, preset, centre, width, show_overlay, opacity]

        def render(s, idx, pre, c, w, ov, op):
            i = int(idx or 1) - 1
            img = h.render_view(engine, s, i, pre, c, w, ov, op)
            return (None if img is None else h.png_file(img, view_dir)), \
                h.slice_info_html(s, i)

        view_outputs = [image, slice_info]

        # Export files and the save notice belong to one study, draft and model: whenever one
        # of these changes they are hidden and the files deleted, so nothing on the page can
        # offer the previous study's report.
        downloads = [dl_txt, dl_json, dl_fhir, dl_sr]
        stale_outputs = [*downloads, export_msg, save_msg]
        keep_stale = (gr.update(),) * len(stale_outputs)

        def no_downloads(s):
            h.clear_exports(s)  # deletes the files as well
            return (gr.update(value=None, visible=False),) * len(downloads)

        def clear_stale(s):
            return (*no_downloads(s), "", "")

        def on_loaded(s, res: h.Loaded):
            if not res.ok:  # the previous study and the user's text stay; its exports do not
                kept = " The previous study is still shown." if s.study is not None else ""
                return (s, res.message + kept, gr.update(), gr.update(), gr.update(),
                        gr.update(), gr.update(), gr.update(), *clear_stale(s), gr.update(),
                        gr.update(), gr.update(), gr.update())
            menu = (gr.update(visible=True, choices=res.series_choices, value=res.series_index)
                    if len(res.series_choices) > 1 else
                    gr.update(visible=False, choices=[], value=None))
            return (s, res.message,
                    gr.update(visible=res.n_views > 1, maximum=max(res.n_views, 2), value=1),
                    gr.update(visible=res.is_ct), gr.update(value=""),  # editor: new study
                    gr.update(visible=False), "", "Analysing…", *clear_stale(s), menu,
                    gr.update(visible=False), gr.update(choices=[], value=[]),  # chips
                    gr.update(visible=False))  # sentence maps of the previous study's draft

        load_outputs = [session, load_msg, view_idx, ct_box, editor, latest_box, notice,
                        probability, *stale_outputs, series, chips_box, chips, ground_box]

        def analyze(s, idx, *look):
            """The analysis, then the view with its heat map: a fresh analysis of a series
            opens the viewer on its key slice (the slider moves there). Rendered here, not by
            a later step, so no second event races the slider's own renders."""
            a = h.analyze(engine, s)
            at = gr.update() if a.open_view is None else gr.update(value=a.open_view + 1)
            shown = idx if a.open_view is None else a.open_view + 1
            c = h.chips_view(s)
            return (gr.update(visible=bool(a.warning), value=h.warning_html(a.warning)),
                    a.probability, at, *render(s, shown, *look),
                    gr.update(visible=c.visible), gr.update(choices=c.choices, value=c.ticked))

        def after_load(event, name):
            # Named endpoints let scripts (bench/app_load.py) drive the same path as the page.
            (event.then(render, view_inputs, view_outputs, show_progress="hidden")
             .then(analyze, view_inputs, [warning, probability, view_idx, *view_outputs,
                                          chips_box, chips],
                   api_name=f"analyze_{name}")
             .then(lambda s: h.history_markdown(engine, s), session, history))

        after_load(files.upload(lambda s, f: on_loaded(s, h.load_files(engine, s, f)),
                                [session, files], load_outputs, api_name="load_files"), "files")
        after_load(sample_btn.click(lambda s, p: on_loaded(s, h.load_sample(engine, s, p)),
                                    [session, sample], load_outputs, api_name="load_sample"),
                   "sample")

        def pick_series(s, index):
            if h.same_series(s, index):  # nothing changes: the report in progress stays
                return (s, *(gr.update(),) * (len(load_outputs) - 1))
            return on_loaded(s, h.choose_series(engine, s, index))

        # `input`: the user's choice only (a load that sets the menu does not reload)
        after_load(series.input(pick_series, [session, series], load_outputs,
                                api_name="choose_series"), "series")

        # Outside the queue: a slice change is a short request (~15 ms of work), and the
        # queue's join + event stream round trip doubled its time on the page.
        for ctl in (view_idx, show_overlay, opacity, centre, width):
            ctl.change(render, view_inputs, view_outputs, show_progress="hidden", queue=False)
        preset.change(lambda p: gr.update(visible=p == "custom"), preset, custom_row,
                      queue=False).then(render, view_inputs, view_outputs,
                                        show_progress="hidden")
        # ArrowUp/ArrowDown, PageUp/PageDown over the viewer move one slice (SLICE_KEYS_JS).
        demo.load(None, None, None, js=SLICE_KEYS_JS)

        # Draft streaming: the editor is read-only while a draft streams into it (server updates
        # would race keystrokes); a draft over the user's own text goes to "Latest draft".
        # Each output given as gr.update(...) costs the server a new component and its config
        # (Gradio rebuilds the block to apply the update); a plain value is only postprocessed.
        # A streamed update sends the text as a plain value, and the stale exports are cleared
        # once, by the click itself (clear_on_draft), not with every update.
        def stream(s, text, settings=None, inner=None):
            inner = inner or h.stream_draft(engine, s, text, settings,
                                            update_every_s=h.UPDATE_EVERY_S)
            try:
                for u in inner:
                    if u.editor_locked is None and u.editor is not None:
                        ed = u.editor
                    else:
                        ed = gr.update(**({} if u.editor is None else {"value": u.editor}),
                                       **({} if u.editor_locked is None else
                                          {"interactive": not u.editor_locked}))
                    yield (ed,
                           gr.update() if u.latest is None else u.latest,
                           gr.update() if u.latest is None else gr.update(visible=True),
                           u.notice)
            finally:
                inner.close()

        def regenerate(s, text):
            yield from stream(s, text, h.regenerate_settings(s))

        def redraft(s, text, ticked):
            yield from stream(s, text, inner=h.redraft_with_findings(
                engine, s, text, ticked, update_every_s=h.UPDATE_EVERY_S))

        stream_outputs = [editor, latest, latest_box, notice]
        # a new draft: the previous one's saved/exported notices and files go
        clear_on_draft = dict(fn=clear_stale, inputs=session, outputs=stale_outputs, queue=False)

        def ground(s):
            g = h.ground_draft(engine, s)
            return (gr.update(visible=g.visible),
                    gr.update(choices=g.choices, value=h.NO_STATEMENT if g.choices else None),
                    g.message)

        ground_btn.click(ground, session, [ground_box, grounded, ground_msg],
                         concurrency_id="model", concurrency_limit=MODEL_EVENTS,
                         api_name="ground")
        # the maps of the previous draft go when a new one starts
        hide_maps = dict(fn=lambda: gr.update(visible=False), inputs=None, outputs=ground_box,
                         queue=False)
        for btn, fn, kw in ((gen_btn, stream, {"api_name": "generate"}),
                            (regen_btn, regenerate, {}), (redraft_btn, redraft,
                                                          {"api_name": "redraft"})):
            btn.click(**hide_maps)
            btn.click(**clear_on_draft)
            inputs = [session, editor, chips] if btn is redraft_btn else [session, editor]
            btn.click(fn, inputs, stream_outputs, show_progress="hidden",
                      concurrency_id="model", concurrency_limit=MODEL_EVENTS, **kw)

        def pick_statement(s, choice, *look):
            view = h.select_statement(s, choice)
            at = gr.update() if view is None else gr.update(value=view + 1)
            idx = look[0] if view is None else view + 1
            return (at, *render(s, idx, *look[1:]))

        grounded.input(pick_statement, [session, grounded, *view_inputs[1:]],
                       [view_idx, *view_outputs], show_progress="hidden")
        # Stop is cooperative: the stream ends at its next piece and its last update unlocks
        # the editor. (Gradio's `cancels` could land after a new Generate and cancel that one.)
        stop_btn.click(h.stop_message, session, notice, queue=False)

        def edited(s, text):  # user keystrokes: export files of an earlier text are stale
            h.note_edit(s, text)
            if not h.exports_stale(s, text):
                return (gr.update(),) * 4
            return (*no_downloads(s), "The report changed: prepare the export files again.")

        editor.input(edited, [session, editor], [*downloads, export_msg], queue=False,
                     show_progress="hidden")
        use_latest.click(lambda s: (h.take_latest(s), gr.update(visible=False), *clear_stale(s)),
                         session, [editor, latest_box, *stale_outputs], queue=False)

        def save(s, text, who, ticked, request: gr.Request):
            if auth:  # the login is the reviewer; a value sent for the locked box is ignored
                who = getattr(request, "username", None) or ""
            out = h.save(engine, s, text, who, ticked)
            return out.message, h.history_markdown(engine, s) if out.ok else gr.update()

        save_btn.click(save, [session, editor, reviewer, chips], [save_msg, history],
                       concurrency_id="db")

        def export(s, text, who, request: gr.Request):
            if auth:
                who = getattr(request, "username", None) or ""
            paths, msg = h.export_files(engine, s, text, who, export_dir)
            if not paths:
                return (*no_downloads(s), msg)
            return (*(gr.update(value=p, visible=True) for p in paths), msg)

        export_btn.click(export, [session, editor, reviewer], [*downloads, export_msg])

        # ---------------------------------------------------------------- model versions
        def refresh_versions(keep=None):
            opts = mp.model_choices(engine, model_roots)
            paths = [p for _, p in opts]
            return gr.update(choices=opts, value=keep if keep in paths else
                             (paths[0] if paths else None))

        def refused(request: gr.Request | None, action: str):
            user = getattr(request, "username", None) if request is not None else None
            return mp.admin_check(auth, user, admin_open, action)

        def use_model(s, path, request: gr.Request):
            why = refused(request, "switch the live model")
            if why:
                return (why, gr.update(), gr.update(), *keep_stale)
            ok, msg = mp.switch_model(engine, path, model_roots)  # a new model: this page's exports go
            return (msg, h.model_info_markdown(engine), refresh_versions(path),
                    *(clear_stale(s) if ok else keep_stale))

        use_btn.click(use_model, [session, version], [model_msg, model_info, version,
                                                      *stale_outputs], concurrency_id="admin")

        def run_finetune(path, request: gr.Request):
            why = refused(request, "start fine-tuning")
            if why:
                yield why, gr.update()
                return
            msg = ""
            for msg in mp.finetune(engine):
                yield msg, gr.update()
            yield msg, refresh_versions(path)  # the new version is listed, not switched to

        # Own queue slot: the polling generator sleeps in a worker thread, so drafts and
        # saves of other sessions are not held up.
        ft_btn.click(run_finetune, version, [model_msg, version], concurrency_id="finetune",
                     concurrency_limit=1)

        # The page is built once; a reload shows the model in use now (another admin may
        # have switched it) and the versions on disk now.
        demo.load(lambda v: (h.model_info_markdown(engine), refresh_versions(v)), version,
                  [model_info, version], queue=False)

        if auth:  # signed-in user = reviewer name; non-admins see the panel is read-only
            def who(request: gr.Request):
                user = getattr(request, "username", None) or ""
                return user, ("" if mp.admin_check(auth, user, admin_open) is None
                              else mp.READ_ONLY_NOTE)
            demo.load(who, None, [reviewer, model_msg], queue=False)
    return demo


# Keyboard scrolling through a series: ArrowDown/PageDown = next slice, ArrowUp/PageUp =
# previous one, while the pointer is over the viewer, its slider or the slice plot, or one of
# them has the focus (a click on the image focuses Gradio's button around it; Tab reaches it
# too). Keys typed into a text field (the report editor, the reviewer, the window numbers,
# menus) are never taken.
SLICE_KEYS_JS = """() => {
  if (window.__mrgSliceKeys) return;
  window.__mrgSliceKeys = true;
  const REGION = "#viewer, #view-index, #slice-info";
  const STEP = {ArrowDown: 1, PageDown: 1, ArrowUp: -1, PageUp: -1};
  // text fields, menus, radios, checkboxes and other sliders keep their own keys
  const typing = (el) => !!el && (el.isContentEditable || el.tagName === "TEXTAREA" ||
      el.tagName === "SELECT" ||
      (el.tagName === "INPUT" && !(el.type === "range" && el.closest("#view-index"))));
  document.addEventListener("keydown", (e) => {
    const step = STEP[e.key];
    if (!step || e.altKey || e.ctrlKey || e.metaKey || e.shiftKey || e.isComposing) return;
    if (typing(e.target)) return;
    const range = document.querySelector("#view-index input[type=range]");
    if (!range || range.disabled || !range.offsetParent) return;  // one view: no slider
    const inside = e.target instanceof Element && e.target.closest(REGION);
    const hovered = [...document.querySelectorAll(REGION)].some((el) => el.matches(":hover"));
    if (!inside && !hovered) return;
    e.preventDefault();  // no page scroll, and the slider's own arrow step is not added
    const now = Number(range.value), lo = Number(range.min), hi = Number(range.max);
    const next = Math.min(Math.max(now + step, lo), hi);
    if (next === now) return;
    range.value = String(next);
    range.dispatchEvent(new Event("input", {bubbles: true}));
  }, true);
}"""


def _new_session() -> Session:
    return Session()
