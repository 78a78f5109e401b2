"""`python -m mrg_core inspect` as a real subprocess."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from factories import write_corrupt, write_mono1, write_multiframe
from mrg_core.paths import REPO_ROOT


def _run(*args):
    return subprocess.run([sys.executable, "-m", "mrg_core", "inspect", *map(str, args)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def test_inspect_good_file_with_preview(tmp_path):
    write_mono1(tmp_path / "m1.dcm")
    out = _run(tmp_path / "m1.dcm", "--preview", tmp_path / "p.png")
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout.strip())
    assert rec["file"] == "m1.dcm" and rec["n_views"] == 1
    assert rec["display_size"] == [32, 48] and rec["value_range"] == [0.0, 4095.0]
    assert rec["views"][0]["photometric"] == "MONOCHROME1" and len(rec["content_hash"]) == 64
    img = np.asarray(Image.open(tmp_path / "p.png"))
    assert img.shape == (32, 48) and img[0, 0] > 250  # inverted display


def test_inspect_bad_file_exit_2_and_continues(tmp_path):
    write_corrupt(tmp_path / "bad.dcm")
    write_multiframe(tmp_path / "mf.dcm", frames=3)
    out = _run(tmp_path / "bad.dcm", tmp_path / "mf.dcm", "--preview", tmp_path / "p.png")
    assert out.returncode == 2
    assert "Traceback" not in out.stdout + out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[0]["error"] == "corrupt" and "bad.dcm" in lines[0]["message"]
    assert "damaged" in out.stderr
    assert lines[1]["n_views"] == 3
    assert (tmp_path / "p_1.png").exists() and not (tmp_path / "p_0.png").exists()
