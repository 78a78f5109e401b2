"""Issue 16, the viewer of a real CT series in a headless Chromium.

Series are written here as one DICOM file per slice (ImagePositionPatient along the z axis,
ImageOrientationPatient axial) and handed to the page in a shuffled file order: the page must
show them head first, open on the model's key slice after the analysis, say each slice's
probability under the viewer with a small plot of all of them, draw a slice's heat map when
the slider reaches it (once), move one slice per ArrowDown/ArrowUp over the viewer without
taking keys from the report editor, offer the series of a multi-series upload in a menu (the
chosen one is the study that is analysed and saved), and refuse a CT + CR mix readably.

Expected values come from the served engine itself (engine.load_series / engine.analyze on
the same files), never from the page."""
import random
import zipfile

import numpy as np
import pydicom
import pytest
from playwright.sync_api import expect
from pydicom.uid import generate_uid

from mrg_core.samples import make_ct_phantom, write_ct_dicom
from tests.e2e.test_browser import WAIT_MS, cr_file, wait_text
from tests.e2e.test_viewer_and_upload import (chroma, set_overlay, shows_grey, viewer_pixels,
                                              wait_pixels)

pytestmark = pytest.mark.e2e

SIZE = 64  # pixels a side: small slices keep the analysis and the heat maps quick
ERRORS: dict[int, list[str]] = {}


@pytest.fixture
def page(browser, served_app):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    errors = ERRORS.setdefault(id(page), [])
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(served_app[0])
    page.locator("#generate").wait_for(timeout=WAIT_MS)
    yield page
    page.close()
    assert not ERRORS.pop(id(page), None), "uncaught errors in the page's scripts"


@pytest.fixture
def engine(served_app):
    return served_app[2]


# ---------------------------------------------------------------------------- series files

def slice_hu(z: int, peak: int, n: int, seed: int) -> np.ndarray:
    """A chest phantom slice with a dense disc that is widest on slice `peak` and shrinks
    away from it: the slices' probabilities differ (the tiny test model answers to bright
    areas) and rise towards `peak`."""
    hu = make_ct_phantom(seed=seed, covid=False, size=SIZE)
    r = SIZE * 0.4 * max(0.0, 1 - abs(z - peak) / (n / 2))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    hu[(yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < r * r] = 1500
    return hu


def write_series(folder, n: int, *, number: int, seed: str, thickness: float = 2.5,
                 kernel: str | None = None, missing=(), study_uid: str | None = None,
                 peak: int = 0) -> list:
    """`n` CT slices of one series, one file each, `thickness` mm apart head (z = 100) to feet;
    the positions listed in `missing` are left out (a gap); slice_hu's disc is widest at
    position `peak`. File names are shuffled against the slice order, so only the geometry
    can put them in order. Returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid(entropy_srcs=[seed, "study"])
    series_uid = generate_uid(entropy_srcs=[seed, "series"])
    positions = [i for i in range(n + len(missing)) if i not in missing]
    names = random.Random(seed).sample(range(n), n)  # file name k holds slice names[k]
    paths = []
    for k, slice_no in enumerate(names):
        z = positions[slice_no]
        hu = slice_hu(z, peak, n, seed=100 * number + z)
        path = folder / f"{seed}_{k:03d}.dcm"
        write_ct_dicom(path, hu, seed=f"{seed}-{z}")
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SeriesNumber, ds.InstanceNumber = number, slice_no + 1
        ds.SliceThickness = thickness
        ds.ImagePositionPatient = [-SIZE * 0.35, -SIZE * 0.35, 100.0 - thickness * z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        if kernel:
            ds.ConvolutionKernel = kernel
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def upload_files(page, paths):
    page.locator("#upload input[type=file]").set_input_files([str(p) for p in paths])


def slider_value(page) -> int:
    return int(float(page.locator("#view-index input[type=range]").input_value()))


def expect_slider(page, value: int):
    expect(page.locator("#view-index input[type=range]")).to_have_value(str(value),
                                                                        timeout=WAIT_MS)


def expect_slice_line(page, text: str):
    expect(page.locator("#slice-info .mrg-slice-text")).to_have_text(text, timeout=WAIT_MS)


def slice_text(analysis, index: int, n: int) -> str:
    p = analysis.view_probabilities[index]
    key = " — key slice" if index == analysis.key_views[0] else (
        f" — among the {len(analysis.key_views)} most probable slices"
        if index in analysis.key_views else "")
    return f"slice {index + 1}/{n}: p {p:.2f}{key}"


def study_of(engine, paths):
    studies = engine.load_series([str(p) for p in paths])
    return studies, [engine.analyze(s) for s in studies]


# ---------------------------------------------------------------------------- key slice

def test_series_opens_on_the_key_slice_with_its_probability_and_plot(page, engine, tmp_path):
    paths = write_series(tmp_path / "a", 12, number=3, seed="key", peak=6)
    (study,), (analysis,) = study_of(engine, paths)
    n, key = 12, analysis.key_views[0]
    assert study.series is not None and study.series.n_slices == n
    assert key > 0, "the test series should open away from its first slice"
    probs = analysis.view_probabilities  # told apart at the two decimals the page shows
    assert len({f"{p:.2f}" for p in probs}) >= 4 and f"{probs[0]:.2f}" != f"{probs[key]:.2f}"

    upload_files(page, paths)
    wait_text(page, "#load-message", "series 3: 12 slices, 2.5 mm thick, 2.5 mm apart")
    wait_text(page, "#probability", "Pneumonia probability")
    wait_text(page, "#probability", f"key slice {key + 1}")

    # the viewer opened on the key slice: slider, the slice line, and the pixels shown
    expect_slider(page, key + 1)
    expect_slice_line(page, slice_text(analysis, key, n))
    wait_pixels(page, lambda rgb: rgb.shape[:2] == (SIZE, SIZE) and chroma(rgb) > 5,
                "the key slice with its heat map")
    set_overlay(page, False)
    wait_pixels(page, shows_grey(study.views[key].display), f"slice {key + 1}, the key slice")

    # the plot: one point per slice, the study threshold, the current slice marked
    plot = page.locator("#slice-info svg.mrg-slice-plot")
    expect(plot).to_be_visible()
    points = plot.locator("polyline.mrg-curve").get_attribute("points").split()
    assert len(points) == n
    ys = [float(p.split(",")[1]) for p in points]
    # higher probability = higher on the plot
    assert all((ys[i] < ys[j]) == (probs[i] > probs[j]) for i in range(n) for j in range(n)
               if abs(probs[i] - probs[j]) > 1e-3)
    expect(plot.locator("line.mrg-threshold")).to_have_count(1)
    expect(plot.locator("circle.mrg-current")).to_have_attribute("data-slice", str(key + 1))
    assert plot.bounding_box()["height"] < 160  # a small plot under the viewer
    viewer_box = page.locator("#viewer").bounding_box()
    assert plot.bounding_box()["y"] > viewer_box["y"] + viewer_box["height"] - 1
    expect(page.locator("#slice-info")).to_contain_text(
        f"dashed line: study threshold {analysis.threshold:.2f}")

    # every slider position shows its slice, head first (files were shuffled)
    for pos in (1, n):
        page.locator("#view-index input[type=range]").evaluate(
            "(el, v) => { el.value = String(v);"
            " el.dispatchEvent(new Event('input', {bubbles: true})); }", pos)
        wait_pixels(page, shows_grey(study.views[pos - 1].display), f"slice {pos}")
        expect_slice_line(page, slice_text(analysis, pos - 1, n))
    zs = [v.meta.slice_position for v in study.views]
    assert zs == sorted(zs, reverse=True)


# ---------------------------------------------------------------------------- keys + maps

def test_arrow_keys_over_the_viewer_move_one_slice_and_maps_are_made_once(page, engine,
                                                                          tmp_path,
                                                                          monkeypatch):
    paths = write_series(tmp_path / "k", 12, number=4, seed="keys", peak=3)
    (study,), (analysis,) = study_of(engine, paths)
    n, key = 12, analysis.key_views[0]
    calls = []  # slices whose Grad-CAM the page asked for after the analysis
    real = engine.view_heatmap
    monkeypatch.setattr(engine, "view_heatmap",
                        lambda st, i: calls.append(i) or real(st, i))

    upload_files(page, paths)
    wait_text(page, "#probability", "Pneumonia probability")
    expect_slider(page, key + 1)
    step = 1 if key + 1 < n else -1  # a neighbour inside the series
    down, up = ("ArrowDown", "ArrowUp") if step == 1 else ("ArrowUp", "ArrowDown")

    page.locator("#viewer").hover()
    page.keyboard.press(down)
    expect_slider(page, key + 1 + step)
    expect_slice_line(page, slice_text(analysis, key + step, n))
    expect(page.locator("#slice-info circle.mrg-current")).to_have_attribute(
        "data-slice", str(key + 1 + step))
    # the neighbour's heat map is made when it is reached, over its own pixels
    wait_pixels(page, lambda rgb: rgb.shape[:2] == (SIZE, SIZE) and chroma(rgb) > 5,
                f"slice {key + 1 + step} with its heat map")
    assert calls == [key + step], calls

    page.keyboard.press(up)  # back on the key slice, then to the neighbour again
    expect_slider(page, key + 1)
    page.keyboard.press(down)
    expect_slider(page, key + 1 + step)
    wait_pixels(page, lambda rgb: chroma(rgb) > 5, "the neighbour's map again")
    page.wait_for_timeout(500)
    assert calls == [key + step], f"a slice's map was made again: {calls}"

    # PageUp/PageDown too, one slice each; the slider stops at the ends
    page.keyboard.press("PageUp" if step == 1 else "PageDown")
    expect_slider(page, key + 1)

    # keys typed in the report editor stay there, with the pointer over the viewer
    editor = page.locator("#editor textarea")
    editor.fill("line one\nline two")
    editor.press("ArrowUp")
    page.locator("#viewer").hover()
    editor.press(down)
    editor.press(down)
    editor.press_sequentially("!")
    page.wait_for_timeout(500)
    assert slider_value(page) == key + 1
    assert editor.input_value().count("!") == 1

    # the viewer takes focus on a click; keys move it with the pointer elsewhere
    page.locator("#viewer").click()
    page.mouse.move(5, 5)
    page.keyboard.press(down)
    expect_slider(page, key + 1 + step)
    assert viewer_pixels(page) is not None


# ---------------------------------------------------------------------------- several series

def test_two_series_in_one_zip_offer_a_menu_and_the_chosen_one_is_the_study(page, engine,
                                                                            tmp_path):
    study_uid = generate_uid(entropy_srcs=["two", "study"])
    soft = write_series(tmp_path / "soft", 12, number=2, seed="soft", study_uid=study_uid,
                        peak=5)
    lung = write_series(tmp_path / "lung", 8, number=5, seed="lung", thickness=1.25,
                        kernel="B70f", missing=(3,), study_uid=study_uid, peak=6)
    archive = tmp_path / "exam.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in random.Random(7).sample(soft + lung, len(soft) + len(lung)):
            zf.write(p, f"exam/{p.name}")
    studies, analyses = study_of(engine, [archive])
    assert [s.series.series_number for s in studies] == [2, 5]
    labels = [s.series.describe() for s in studies]

    page.locator("#upload input[type=file]").set_input_files(str(archive))
    wait_text(page, "#load-message", "2 series")
    wait_text(page, "#load-message", "series 2: 12 slices")
    wait_text(page, "#probability", "Pneumonia probability")
    menu = page.locator("#series")
    expect(menu).to_be_visible()
    expect(menu.locator("input")).to_have_value(labels[0])
    expect_slider(page, analyses[0].key_views[0] + 1)
    expect(page.locator("#view-index [data-testid=max-value]")).to_have_text("12")

    menu.locator("input").click()
    options = page.get_by_role("option")
    expect(options).to_have_count(2)
    assert [t.replace("✓", "").strip() for t in options.all_inner_texts()] == labels
    page.get_by_role("option", name=labels[1], exact=True).click()

    # series 5 is the study now: its description (with the missing slice), its slices, its
    # analysis, opened on its own key slice
    wait_text(page, "#load-message", "series 5 (B70f): 8 slices, 1.25 mm thick, 1.25 mm apart")
    wait_text(page, "#load-message", "Slices seem to be missing: the gap after slice 3 of 8 "
                                     "is 2.5 mm, where the others are 1.25 mm apart.")
    expect(page.locator("#view-index [data-testid=max-value]")).to_have_text("8",
                                                                             timeout=WAIT_MS)
    b, key = analyses[1], analyses[1].key_views[0]
    expect_slider(page, key + 1)
    expect_slice_line(page, slice_text(b, key, 8))
    wait_text(page, "#probability", f"Pneumonia probability {b.probability:.2f}")
    set_overlay(page, False)
    wait_pixels(page, shows_grey(studies[1].views[key].display), "series 5's key slice")

    # a saved report belongs to the chosen series
    page.locator("#editor textarea").fill("Series 5: small ground-glass focus.")
    page.locator("#reviewer textarea, #reviewer input").first.fill("Dr Series")
    page.locator("#save").click()
    wait_text(page, "#save-message", "Saved as correction #")
    assert [r.final_text for r in engine.history(studies[1])] == [
        "Series 5: small ground-glass focus."]
    assert engine.history(studies[0]) == []

    # and back: series 2 again, a new study for the page (the editor starts empty)
    menu.locator("input").click()
    page.get_by_role("option", name=labels[0], exact=True).click()
    wait_text(page, "#load-message", "Showing CT CHEST, series 2: 12 slices")
    expect(page.locator("#view-index [data-testid=max-value]")).to_have_text("12",
                                                                             timeout=WAIT_MS)
    expect(page.locator("#editor textarea")).to_have_value("")
    expect_slider(page, analyses[0].key_views[0] + 1)


# ---------------------------------------------------------------------------- refusals

def test_a_ct_series_mixed_with_a_radiograph_is_refused(page, tmp_path):
    paths = write_series(tmp_path / "ct", 4, number=1, seed="mix")
    upload_files(page, [*paths, cr_file(tmp_path)])
    wait_text(page, "#load-message", "Could not load the study")
    message = page.locator("#load-message").inner_text()
    assert "different kinds of image" in message and "CT DICOM" in message \
        and "CR DICOM" in message, message
    expect(page.locator("#series")).to_be_hidden()
    expect(page.locator("#view-index")).to_be_hidden()
    assert viewer_pixels(page) is None
