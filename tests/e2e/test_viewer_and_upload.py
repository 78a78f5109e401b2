"""The viewer in a real headless Chromium: several files make one study whose views the slider
shows one by one, rejected files get a clear message and break nothing, and the overlay,
its opacity and the CT window presets change the pixels on screen.

Pixels are read back from the page: the `#viewer img` source is fetched through the page and
decoded, then compared with references computed here from the input files (a grey PNG's own
values, HU through a linear window) or with each other (opacity blends linearly)."""
import re
from io import BytesIO
from urllib.parse import urljoin

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from mrg_core.io import load_study
from tests import factories
from tests.e2e.test_browser import CT_SAMPLE, WAIT_MS, upload, wait_text

pytestmark = pytest.mark.e2e

PIXEL_WAIT_S = 20.0
SCRIPT_ERRORS: dict[int, list[str]] = {}  # id(page) -> uncaught errors in the page's scripts


@pytest.fixture
def page(browser, served_app):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = SCRIPT_ERRORS.setdefault(id(page), [])
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(served_app[0])
    page.locator("#generate").wait_for(timeout=WAIT_MS)
    yield page
    page.close()
    SCRIPT_ERRORS.pop(id(page), None)


# ---------------------------------------------------------------------------- helpers

def viewer_pixels(page) -> np.ndarray | None:
    """The image the viewer shows now, as RGB uint8 (None when it shows none)."""
    img = page.locator("#viewer img").first
    if not img.count() or not img.get_attribute("src"):
        return None
    src = img.get_attribute("src")
    response = page.request.get(urljoin(page.url, src))
    assert response.ok, f"viewer image {src}: HTTP {response.status}"
    return np.asarray(Image.open(BytesIO(response.body())).convert("RGB"))


def wait_pixels(page, check, what: str) -> np.ndarray:
    """Poll the viewer until check(pixels) holds; fail with `what` when it never does."""
    last = None
    deadline = page.evaluate("Date.now()") + PIXEL_WAIT_S * 1000
    while page.evaluate("Date.now()") < deadline:
        last = viewer_pixels(page)
        if last is not None and check(last):
            return last
        page.wait_for_timeout(250)
    shape = None if last is None else last.shape
    pytest.fail(f"the viewer never showed {what} (last image: {shape})")


def is_grey(rgb: np.ndarray) -> bool:
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def chroma(rgb: np.ndarray) -> float:
    """Mean spread between the colour channels (0 for grey)."""
    rgb = rgb.astype(np.int16)
    return float((rgb.max(axis=2) - rgb.min(axis=2)).mean())


def shows_grey(expected: np.ndarray, tol: int = 0):
    """check(): the viewer shows exactly this grey image (within tol grey levels)."""
    def check(rgb):
        return rgb.shape[:2] == expected.shape and is_grey(rgb) and \
            int(np.abs(rgb[..., 0].astype(np.int16) - expected).max()) <= tol
    return check


def set_slider(page, label: str, value: float):
    """Move a Gradio slider as a drag does: the range input's value, then its events."""
    rng = page.get_by_label(f"range slider for {label}")
    rng.evaluate("(el, v) => { el.value = String(v);"
                 " el.dispatchEvent(new Event('input', {bubbles: true}));"
                 " el.dispatchEvent(new Event('change', {bubbles: true}));"
                 " el.dispatchEvent(new PointerEvent('pointerup', {bubbles: true})); }", value)


def set_overlay(page, on: bool):
    box = page.locator("#overlay input[type=checkbox]")
    if box.is_checked() != on:
        box.click()
    expect(box).to_be_checked(checked=on)


def load_ct_sample(page):
    upload(page, CT_SAMPLE)
    wait_text(page, "#load-message", "CT CHEST, 1 view")
    wait_text(page, "#probability", "Pneumonia probability")


def assert_page_intact(page):
    body = page.locator("body").inner_text()
    assert "Traceback" not in body and "Exception" not in body
    errors = SCRIPT_ERRORS.get(id(page))
    assert not errors, errors


# ---------------------------------------------------------------------------- several files

def test_several_files_are_one_study_and_the_slider_shows_each_view(page, tmp_path):
    rng = np.random.default_rng(5)
    views = {  # three grey PNGs, told apart by their size; 8-bit grey is shown as it is
        "a_ramp.png": np.tile(np.linspace(0, 255, 48).astype(np.uint8), (64, 1)),
        "b_noise.png": rng.integers(0, 256, (72, 56), dtype=np.uint8),
        "c_blocks.png": np.kron(np.array([[30, 200], [120, 60]], np.uint8),
                                np.ones((40, 32), np.uint8)),
    }
    paths = []
    for name, arr in views.items():
        factories.save_image(tmp_path / name, arr)
        paths.append(str(tmp_path / name))
    by_shape = {arr.shape: name for name, arr in views.items()}
    assert len(by_shape) == 3

    page.locator("#upload input[type=file]").set_input_files(paths)
    wait_text(page, "#load-message", "3 views")
    wait_text(page, "#probability", "Pneumonia probability")
    slider = page.locator("#view-index")
    expect(slider).to_be_visible(timeout=WAIT_MS)
    expect(slider.get_by_test_id("max-value")).to_have_text("3")
    set_overlay(page, False)  # the file's own pixels, no heat map

    seen = {}  # slider position -> the shape of the view shown there
    names = list(views)  # plain images are one study in the order given
    for position in (1, 2, 3):  # position k shows the k-th file (a render for an earlier
        # position can still arrive on a loaded machine: wait for this one's)
        set_slider(page, "View / slice", position)
        name = names[position - 1]
        shown = wait_pixels(page, lambda rgb: rgb.shape[:2] == views[name].shape and
                            is_grey(rgb), f"{name} at slider position {position}, no overlay")
        assert np.array_equal(shown[..., 0], views[name]), f"view {position} is not {name}"
        seen[position] = shown.shape[:2]
    assert sorted(seen.values()) == sorted(by_shape), f"views shown: {seen}"
    set_slider(page, "View / slice", 1)  # and back
    wait_pixels(page, lambda rgb: rgb.shape[:2] == seen[1], "the first view again")

    # with the overlay, each view has its own heat map over its own pixels
    set_overlay(page, True)
    for position in (1, 2, 3):
        set_slider(page, "View / slice", position)
        wait_pixels(page, lambda rgb: rgb.shape[:2] == seen[position] and chroma(rgb) > 5,
                    f"view {position} with its heat map")
    assert_page_intact(page)


# ---------------------------------------------------------------------------- rejected files

def test_rejected_files_get_a_clear_message_and_break_nothing(page, tmp_path):
    corrupt = tmp_path / "damaged_scan.dcm"
    factories.write_corrupt(corrupt)  # DICM preamble, then garbage
    upload(page, corrupt)
    wait_text(page, "#load-message", "Could not load the study")
    message = page.locator("#load-message").inner_text()
    assert "damaged_scan.dcm" in message and "damaged" in message.replace("damaged_scan", "")
    assert viewer_pixels(page) is None  # nothing half-loaded is shown
    expect(page.locator("#view-index")).to_be_hidden()

    # A file that claims to be an image but is not: named, refused.
    fake = tmp_path / "report.png"
    fake.write_bytes(b"%PDF-1.4\n" + b"not an image at all\n" * 50)
    page.locator("#upload button[aria-label='Clear']").first.click()
    upload(page, fake)
    wait_text(page, "#load-message", "report.png is not a DICOM, PNG or JPEG image")

    # A good file with a damaged one: one study cannot be half made; the bad file is named.
    good = tmp_path / "good.png"
    factories.save_image(good, np.full((40, 40), 99, np.uint8))
    page.locator("#upload button[aria-label='Clear']").first.click()
    page.locator("#upload input[type=file]").set_input_files([str(good), str(corrupt)])
    wait_text(page, "#load-message", "damaged_scan.dcm is damaged")
    assert viewer_pixels(page) is None

    # A format the page does not take (BMP): refused by the upload box or by the loader,
    # either way with words a user understands.
    bmp = tmp_path / "scan.bmp"
    Image.fromarray(np.full((20, 20), 50, np.uint8)).save(bmp, format="BMP")
    page.locator("#upload button[aria-label='Clear']").first.click()
    upload(page, bmp)
    page.locator(".toast-body, #load-message").filter(
        has_text=re.compile(r"Invalid file type|scan\.bmp is not a DICOM, PNG or JPEG")
    ).first.wait_for(timeout=WAIT_MS)
    assert viewer_pixels(page) is None

    # Nothing broke: the next study loads, is analysed and shown.
    if page.locator("#upload table, #upload .file-preview").count():  # a file is listed
        page.locator("#upload button[aria-label='Clear']").first.click()
    load_ct_sample(page)
    wait_pixels(page, lambda rgb: rgb.shape[:2] == (512, 512), "the CT after the refusals")
    expect(page.locator("#view-index")).to_be_hidden()
    assert_page_intact(page)


# ---------------------------------------------------------------------------- overlay

def test_overlay_checkbox_and_opacity_change_the_pixels(page):
    grey = load_study(CT_SAMPLE).views[0].display  # the file's own display
    load_ct_sample(page)
    at_default = wait_pixels(page, lambda rgb: rgb.shape[:2] == grey.shape and chroma(rgb) > 5,
                             "the heat map over the CT (overlay on by default)")

    set_overlay(page, False)
    wait_pixels(page, shows_grey(grey), "the plain CT when the overlay is off")

    set_overlay(page, True)
    set_slider(page, "Overlay opacity", 1.0)
    full = wait_pixels(page, lambda rgb: rgb.shape[:2] == grey.shape and
                       chroma(rgb) > chroma(at_default) + 5, "a stronger heat map at opacity 1")
    # opacity blends: shown = (1 - a) * grey + a * heat, so opacity 0.4 lies between the
    # plain CT and the full heat map at 0.4 of the way (within rounding)
    base = np.repeat(grey[..., None].astype(np.float32), 3, axis=2)
    between = 0.6 * base + 0.4 * full.astype(np.float32)
    assert np.abs(at_default.astype(np.float32) - between).max() <= 1.5

    set_slider(page, "Overlay opacity", 0.0)
    wait_pixels(page, shows_grey(grey), "the plain CT at opacity 0")
    set_slider(page, "Overlay opacity", 0.4)
    wait_pixels(page, lambda rgb: np.array_equal(rgb, at_default), "opacity 0.4 again")
    assert_page_intact(page)


# ---------------------------------------------------------------------------- CT windows

def hu_window(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    """An independent linear window: centre - width/2 → black, centre + width/2 → white."""
    return np.clip((hu - (centre - width / 2)) / width, 0, 1) * 255


def test_ct_window_presets_change_the_pixels(page):
    view = load_study(CT_SAMPLE).views[0]
    hu = view.values.astype(np.float64)
    assert view.meta.units == "HU" and hu.min() < -900 and hu.max() > 500
    load_ct_sample(page)
    set_overlay(page, False)
    wait_pixels(page, shows_grey(view.display), "the CT in its own window")

    windows = {"lung": (-600, 1500), "mediastinum": (40, 400), "bone": (400, 1800)}
    shown = {}
    for preset in ("mediastinum", "bone", "lung"):
        page.get_by_role("radio", name=preset, exact=True).click()
        expected = hu_window(hu, *windows[preset])
        shown[preset] = wait_pixels(page, shows_grey(expected, tol=1),
                                    f"the {preset} window {windows[preset]}")
    # the presets really differ on this slice: the lung (HU < -160) is black in the
    # mediastinum window and grey in the lung window
    assert not np.array_equal(shown["mediastinum"], shown["bone"])
    assert not np.array_equal(shown["mediastinum"], shown["lung"])
    assert (shown["mediastinum"][..., 0] == 0).mean() > (shown["lung"][..., 0] == 0).mean() + 0.1

    # custom: the centre and width typed in
    page.get_by_role("radio", name="custom", exact=True).click()
    page.get_by_label("Window centre (HU)").fill("-200")
    page.get_by_label("Window centre (HU)").press("Enter")
    page.get_by_label("Window width (HU)").fill("600")
    page.get_by_label("Window width (HU)").press("Enter")
    wait_pixels(page, shows_grey(hu_window(hu, -200, 600), tol=1), "the custom window -200/600")

    page.get_by_role("radio", name="default", exact=True).click()
    wait_pixels(page, shows_grey(view.display), "the CT in its own window again")
    assert_page_intact(page)


# ---------------------------------------------------------------------------- PHI at rest

def test_uploaded_originals_are_deleted_once_read(page, tmp_path):
    """The original upload (a DICOM with the patient's name inside) does not stay in Gradio's
    upload folder: the loader reads it, the page keeps the de-identified study."""
    import uuid

    from ui.upload_cache import upload_folder

    name = f"upload_{uuid.uuid4().hex}.dcm"
    (tmp_path / name).write_bytes(CT_SAMPLE.read_bytes())
    upload(page, tmp_path / name)
    wait_text(page, "#load-message", "CT CHEST, 1 view")
    wait_text(page, "#probability", "Pneumonia probability")
    assert not [p for p in upload_folder().rglob(name)], "the original upload is still cached"
    # a file that fails to load goes too
    bad = tmp_path / f"bad_{uuid.uuid4().hex}.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + bytes(300))
    page.locator("#upload button[aria-label='Clear']").first.click()
    upload(page, bad)
    wait_text(page, "#load-message", "Could not load")
    assert not [p for p in upload_folder().rglob(bad.name)]


# ---------------------------------------------------------------------------- size on screen

def painted(page) -> dict:
    """Where the viewer's picture is painted, in CSS px of the viewport. The <img> box alone
    does not say: object-fit decides how the picture sits in it (Gradio's own scale-down
    paints a 64x64 study at 64x64 in the middle of a 520 px box)."""
    page.locator("#viewer").scroll_into_view_if_needed()
    return page.locator("#viewer img").first.evaluate("""img => {
        const box = img.getBoundingClientRect(), style = getComputedStyle(img);
        const viewer = img.closest('#viewer').getBoundingClientRect();
        const nw = img.naturalWidth, nh = img.naturalHeight, fit = style.objectFit;
        let sx = box.width / nw, sy = box.height / nh;                      // fill
        if (fit === 'contain' || fit === 'scale-down') sx = sy = Math.min(sx, sy);
        if (fit === 'scale-down') sx = sy = Math.min(sx, 1);
        if (fit === 'cover') sx = sy = Math.max(sx, sy);
        if (fit === 'none') sx = sy = 1;
        const w = nw * sx, h = nh * sy;
        return {natural: [nw, nh], width: w, height: h, position: style.objectPosition,
                left: box.left + (box.width - w) / 2, top: box.top + (box.height - h) / 2,
                box: [box.left, box.top, box.right, box.bottom],
                viewer: [viewer.left, viewer.top, viewer.right, viewer.bottom],
                rendering: style.imageRendering};
    }""")


def wait_shown(page, expected: np.ndarray) -> dict:
    """Wait until the viewer's <img> holds this grey image, loaded; where it is painted."""
    wait_pixels(page, shows_grey(expected), f"the {expected.shape} test image")
    rows, cols = expected.shape
    page.wait_for_function("([w, h]) => { const i = document.querySelector('#viewer img');"
                           " return i && i.complete && i.naturalWidth === w &&"
                           " i.naturalHeight === h; }", arg=[cols, rows], timeout=WAIT_MS)
    return painted(page)


def assert_fits(g: dict, what: str):
    """Painted inside the <img> box and the viewer, aspect ratio kept, filling the box one way."""
    nw, nh = g["natural"]
    left, top, right, bottom = g["left"], g["top"], g["left"] + g["width"], g["top"] + g["height"]
    assert g["position"] == "50% 50%", g  # painted() centres the picture in its box
    for (l, t, r, b), where in ((g["box"], "its <img> box"), (g["viewer"], "the viewer")):
        assert l - 0.5 <= left and t - 0.5 <= top and right <= r + 0.5 and bottom <= b + 0.5, \
            f"{what} is painted outside {where}: {g}"
    assert abs(g["width"] / g["height"] - nw / nh) < 0.01, f"{what} is stretched: {g}"
    box_w, box_h = g["box"][2] - g["box"][0], g["box"][3] - g["box"][1]
    assert min(box_w - g["width"], box_h - g["height"]) < 1, f"{what} does not fill the box: {g}"
    view_w, view_h = g["viewer"][2] - g["viewer"][0], g["viewer"][3] - g["viewer"][1]
    assert box_w >= 0.9 * view_w and box_h >= 0.9 * view_h, f"the <img> box is small: {g}"


# The viewer and everything around it drawn opaque and still: while an event that updates
# the viewer runs (the analysis after an upload), Gradio draws it at opacity 0.2 or flashing
# (`.pending`), and a screenshot then shows a checkerboard's white squares grey (CI, once).
SETTLED_JS = """() => {
    for (let e = document.querySelector('#viewer img'); e; e = e.parentElement) {
        const s = getComputedStyle(e);
        if (s.opacity !== '1' || s.animationName !== 'none') return false;
    }
    return document.querySelector('#viewer img') !== null;
}"""


def screen_grey(page, g: dict) -> np.ndarray:
    """The screen's grey levels over the painted picture (a viewport screenshot, at 1 device px
    per CSS px, cropped inward to whole pixels), once the viewer is drawn opaque and still."""
    assert page.evaluate("devicePixelRatio") == 1
    page.wait_for_function(SETTLED_JS, timeout=WAIT_MS)
    shot = np.asarray(Image.open(BytesIO(page.screenshot())).convert("L"))
    x0, y0 = int(np.ceil(g["left"])), int(np.ceil(g["top"]))
    x1, y1 = int(np.floor(g["left"] + g["width"])), int(np.floor(g["top"] + g["height"]))
    return shot[y0:y1, x0:x1]


def runs(line: np.ndarray) -> list[int]:
    """Lengths of the runs of equal black/white along a line of screen pixels."""
    edges = np.flatnonzero(np.diff(line >= 128)) + 1
    return np.diff(np.concatenate([[0], edges, [len(line)]])).tolist()


def test_small_studies_fill_the_viewer_crisply_and_large_ones_fit_smoothly(page, tmp_path):
    """A 64x64 study is enlarged to fill the 520 px viewer, each of its pixels a sharp square
    (nearest-neighbour, not a blur); a 1024x1024 one is reduced to fit, not cropped, with
    the browser's smoothing: nearest-neighbour there would drop whole rows of the study
    (Chromium applies `image-rendering: pixelated` to reductions too)."""
    set_overlay(page, False)  # the file's own pixels

    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)  # 1 px squares
    factories.save_image(tmp_path / "tiny_64.png", checker)
    upload(page, tmp_path / "tiny_64.png")
    wait_text(page, "#load-message", "64×64")
    small = wait_shown(page, checker)
    scale = small["width"] / 64
    assert scale >= 4, f"a 64x64 study is shown only {scale:.2f}x its size: {small}"
    assert_fits(small, "the 64x64 study")
    assert small["rendering"] in ("pixelated", "crisp-edges"), small
    screen = screen_grey(page, small)
    blurred = float(((screen > 30) & (screen < 225)).mean())
    assert blurred < 0.01, f"{blurred:.1%} of the enlarged checkerboard is grey: blurred"
    for line in (screen[screen.shape[0] // 2], screen[:, screen.shape[1] // 2]):
        lengths = runs(line)  # one run per study pixel, each about `scale` screen pixels
        assert len(lengths) == 64, f"{len(lengths)} squares across, not 64: {lengths}"
        assert all(np.floor(scale) - 1 <= n <= np.ceil(scale) + 1 for n in lengths[1:-1]), \
            f"uneven squares at {scale:.2f}x: {lengths}"

    stripes = np.tile((np.arange(1024) % 2 * 255).astype(np.uint8), (1024, 1))  # 1 px lines
    factories.save_image(tmp_path / "large_1024.png", stripes)
    page.locator("#upload button[aria-label='Clear']").first.click()
    upload(page, tmp_path / "large_1024.png")
    wait_text(page, "#load-message", "1024×1024")
    large = wait_shown(page, stripes)
    assert_fits(large, "the 1024x1024 study")
    (v_left, v_top, v_right, v_bottom) = large["viewer"]
    assert large["width"] <= v_right - v_left + 0.5, large
    assert large["height"] <= v_bottom - v_top + 0.5, large
    assert large["width"] < 1024, large
    assert large["rendering"] not in ("pixelated", "crisp-edges"), \
        f"a reduced study is drawn nearest-neighbour: {large}"
    # 1 px lines reduced ~2x: nearest-neighbour keeps some lines whole and drops the others
    # (all black or white on screen); a smoothing filter mixes neighbouring lines
    screen = screen_grey(page, large)
    unmixed = float(((screen < 10) | (screen > 245)).mean())
    assert unmixed < 0.3, f"{unmixed:.1%} of the reduced lines are pure black or white: " \
        "drawn nearest-neighbour"
    assert_page_intact(page)
