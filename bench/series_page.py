"""Scrolling a CT series on the page (issue 16, target: a slice < 100 ms), in a real browser.

    python bench/series_page.py [--slices 300] [--size 512] [--presses 30]
                                [--model-dir assets/model] [--json bench/results/series_page.json]

A series is generated (bench/series.py: write_series), the real app is started
(`python app.py`, its own upload folder and SQLite file in a temp folder) and a headless
Chromium uploads the series' files through the page's file input, as a user would. Measured:

- upload → probability: from handing the files to the page's file input until the page shows
  the pneumonia probability (upload, load, analysis; the viewer then opens on the key slice);
- scrolling, with the Grad-CAM overlay on: for each ArrowDown/ArrowUp press over the viewer,
  one at a time, from the key event reaching the page (performance.now() in a capturing
  listener) until the viewer's <img> shows another src and that image is decoded
  (MutationObserver + img.decode()). `new`: slices never shown, from the key slice away (their
  heat map is computed on demand: the analysis makes only the key slice's); `revisited`: back
  and forth over those slices (map kept, PNG written already, image in the browser's cache).
  Median, p90 and max in ms for each; `to_src`: the part until the viewer had the new
  image's src (the server's answer), the rest being the image's fetch and decode.

write_series repeats 8 phantom images; the viewer's PNG files are named by their content, so a
repeat would be a file already written and an image the browser already holds. Each slice gets
a little noise of its own here (±8 HU, seeded by its number) so every slice is a new image, as
in a real series; `--repeating-slices` keeps the files as written.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import emit  # noqa: E402

CHROMIUM = "/usr/bin/chromium"  # Debian's, as tests/e2e/conftest.py launches it
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PRESS_TIMEOUT_MS = 60_000

# In the page: arm() before a key press; window.__mrgShown then resolves with the ms from the
# key event to the viewer's next image decoded (or {timeout: true}).
ARM_JS = """(timeoutMs) => {
  const viewer = document.querySelector("#viewer");
  const first = viewer.querySelector("img");
  const old = first ? first.getAttribute("src") : null;
  let tKey = null, settled = false;
  const onKey = () => { if (tKey === null) tKey = performance.now(); };
  window.addEventListener("keydown", onKey, true);  // window capture: before the page's own
  window.__mrgShown = new Promise((resolve) => {
    const finish = (out) => {
      if (settled) return;
      settled = true;
      obs.disconnect();
      clearTimeout(timer);
      window.removeEventListener("keydown", onKey, true);
      resolve(out);
    };
    const check = () => {
      const img = viewer.querySelector("img");
      const src = img && img.getAttribute("src");
      if (!src || src === old || settled || tKey === null) return;
      obs.disconnect();
      const tSrc = performance.now();
      const shown = () => finish({ms: performance.now() - tKey, src_ms: tSrc - tKey, src: src,
                                  width: img.naturalWidth});
      img.decode().then(shown, () => {
        if (img.complete && img.naturalWidth) shown();
        else {
          img.addEventListener("load", shown, {once: true});
          img.addEventListener("error", () => finish({error: "image failed: " + src}),
                               {once: true});
        }
      });
    };
    const obs = new MutationObserver(check);
    obs.observe(viewer, {subtree: true, childList: true, attributes: true,
                         attributeFilter: ["src"]});
    const timer = setTimeout(() => finish({timeout: true}), timeoutMs);
  });
}"""

PROBABILITY_JS = """() => {
  const el = document.querySelector("#probability");
  return !!el && el.innerText.includes("Pneumonia probability");
}"""

VIEWER_READY_JS = """() => {
  const img = document.querySelector("#viewer img");
  return !!img && !!img.getAttribute("src") && img.complete && img.naturalWidth > 0;
}"""


# the analysis has moved the slider to the key slice it names, and the viewer shows an image
KEY_SLICE_JS = """() => {
  const m = (document.querySelector("#probability")?.innerText || "").match(/key slice (\\d+)/);
  const r = document.querySelector("#view-index input[type=range]");
  const img = document.querySelector("#viewer img");
  return !!m && !!r && Number(r.value) === Number(m[1]) && !!img && img.complete;
}"""


def chromium_path() -> str | None:
    return CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")


def make_distinct(folder: Path) -> None:
    """A few HU of noise of its own on every slice (seeded by its InstanceNumber): no two
    slices share their pixels, as in a real series."""
    import numpy as np
    import pydicom

    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        rng = np.random.default_rng(int(ds.InstanceNumber))
        px = ds.pixel_array.astype(np.int32)
        px += rng.integers(-8, 9, px.shape, dtype=np.int32)
        ds.PixelData = np.clip(px, 0, 4095).astype(np.uint16).tobytes()
        ds.save_as(path, enforce_file_format=True)


@contextlib.contextmanager
def _app_env(uploads: Path):
    """os.environ for bench.app_load.start_app's child: its own upload folder (emptied by the
    app at start and stop), never an operator's GRADIO_TEMP_DIR."""
    saved = dict(os.environ)
    os.environ["MRG_UPLOAD_DIR"] = str(uploads)
    os.environ.pop("GRADIO_TEMP_DIR", None)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def _summary(timings: list[tuple[float, float]]) -> dict:
    """(shown, src) ms per press → median / p90 / max of each, and every press's figures."""
    if not timings:
        return {"presses": 0}
    ms, src = [t[0] for t in timings], [t[1] for t in timings]
    return {"presses": len(ms), "median_ms": round(statistics.median(ms), 1),
            "p90_ms": round(_pct(ms, 0.9), 1), "max_ms": round(max(ms), 1),
            "min_ms": round(min(ms), 1),
            "to_src_median_ms": round(statistics.median(src), 1),
            "to_src_p90_ms": round(_pct(src, 0.9), 1),
            "all_ms": [round(x, 1) for x in ms], "all_to_src_ms": [round(x, 1) for x in src]}


def _slider(page) -> int:
    return int(float(page.locator("#view-index input[type=range]").input_value()))


def _press(page, key: str, expect_slice: int) -> tuple[float, float]:
    """One key press over the viewer: ms until the next image is shown (the slider on
    `expect_slice`, 1-based), and ms until the viewer had the new image's src (the server's
    part: the event, the render, the answer)."""
    page.evaluate(ARM_JS, PRESS_TIMEOUT_MS)
    page.keyboard.press(key)
    out = page.evaluate("window.__mrgShown")
    if out.get("timeout") or out.get("error"):
        raise RuntimeError(f"{key} towards slice {expect_slice}: "
                           f"{out.get('error') or 'no new image'} "
                           f"(slider at {_slider(page)})")
    if _slider(page) != expect_slice:
        raise RuntimeError(f"{key}: the slider is at {_slider(page)}, not {expect_slice}")
    return float(out["ms"]), float(out["src_ms"])


def measure_page(url: str, files: list[Path], presses: int) -> dict:
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    if exe is None:
        raise RuntimeError(f"{CHROMIUM} is missing (apt-get install chromium)")
    out: dict = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            page.locator("#generate").wait_for(timeout=120_000)
            box = page.locator("#overlay input[type=checkbox]")
            if not box.is_checked():
                box.click()

            t0 = time.perf_counter()
            page.locator("#upload input[type=file]").set_input_files([str(f) for f in files])
            page.wait_for_function(PROBABILITY_JS, timeout=900_000)
            out["upload_to_probability_s"] = round(time.perf_counter() - t0, 2)
            text = page.locator("#probability").inner_text()
            out["probability_text"] = text[text.find("Pneumonia probability"):].strip()
            out["load_message"] = page.locator("#load-message").inner_text().strip()

            # the viewer opens on the key slice (the analysis moves the slider there)
            rng = page.locator("#view-index input[type=range]")
            rng.wait_for(timeout=60_000)
            n = int(float(rng.get_attribute("max")))
            page.wait_for_function(VIEWER_READY_JS, timeout=60_000)
            page.wait_for_function(KEY_SLICE_JS, timeout=60_000)
            out["upload_to_key_slice_s"] = round(time.perf_counter() - t0, 2)
            key = _slider(page)
            page.wait_for_timeout(1000)  # the slider's own render of the key slice settles
            out["slices_on_page"], out["key_slice"] = n, key

            # new slices: away from the key slice, on the side with room
            down_room, up_room = n - key, key - 1
            step = 1 if down_room >= up_room else -1
            fwd = "ArrowDown" if step == 1 else "ArrowUp"
            n_new = min(presses, max(down_room, up_room))
            out["load_average_before_scroll"] = [round(x, 2) for x in os.getloadavg()]
            page.locator("#viewer").hover()
            new_ms, at = [], key
            for _ in range(n_new):
                at += step
                new_ms.append(_press(page, fwd, at))
            # revisited: back and forth over the slices just shown (key slice included)
            old_ms, direction = [], -step
            lo, hi = sorted((key, key + n_new * step))
            for _ in range(presses if n_new else 0):
                if not lo <= at + direction <= hi:
                    direction = -direction
                at += direction
                old_ms.append(_press(page, "ArrowDown" if direction == 1 else "ArrowUp", at))
            out["direction"] = fwd
            out["new_slices"] = _summary(new_ms)
            out["revisited_slices"] = _summary(old_ms)
            out["page_errors"] = errors
        finally:
            browser.close()
    return out


def bench_series_page(n: int = 300, size: int = 512, presses: int = 30,
                      model_dir: Path = REPO / "assets" / "model",
                      repeating_slices: bool = False, app_args=()) -> dict:
    from bench.app_load import start_app
    from bench.series import write_series

    res: dict = {"slices": n, "size": size, "presses": presses,
                 "model_dir": str(model_dir), "cpu_count": os.cpu_count(),
                 "distinct_slices": not repeating_slices,
                 "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="mrg_series_page_") as tmp:
        folder = Path(tmp) / "series"
        t = time.perf_counter()
        write_series(folder, n, size)
        if not repeating_slices:
            make_distinct(folder)
        res["generate_s"] = round(time.perf_counter() - t, 1)
        files = sorted(folder.glob("*.dcm"))
        res["upload_mb"] = round(sum(f.stat().st_size for f in files) / 2**20, 1)
        with _app_env(Path(tmp) / "uploads"):
            t = time.perf_counter()
            proc, url = start_app(model_dir, f"sqlite:///{tmp}/bench.db", app_args)
        res["app_start_s"] = round(time.perf_counter() - t, 1)
        try:
            res.update(measure_page(url, files, presses))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except Exception:
                proc.kill()
    res["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--presses", type=int, default=30,
                   help="key presses onto new slices, and as many over slices seen already")
    p.add_argument("--model-dir", type=Path, default=REPO / "assets" / "model")
    p.add_argument("--repeating-slices", action="store_true",
                   help="keep write_series' 8 repeating images (no per-slice noise)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    res = bench_series_page(a.slices, a.size, a.presses, a.model_dir.resolve(),
                            a.repeating_slices)
    emit(res, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
