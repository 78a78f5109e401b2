"""Helper for the storage process tests (and their shared test-data builders).

As a script: save reviews in a loop and print each correction id on stdout, flushed, only after
`save_review` returned, i.e. after COMMIT. So every id the parent has read must be on disk, even
if this process is then killed with SIGKILL.

    python tests/storage_writer.py URL N TAG      # N < 0: save until killed
"""
from __future__ import annotations

import sys
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mrg_core.storage import DraftRecord, Store, StoreUnavailable  # noqa: E402
from mrg_core.study import Study, study_from_arrays  # noqa: E402


def make_study(seed: int, n_views: int = 2, shape: tuple[int, int] = (48, 40)) -> Study:
    """Deterministic synthetic study: the same seed gives the same content_hash."""
    rng = np.random.default_rng(seed)
    imgs = [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(n_views)]
    return study_from_arrays(imgs, modality="CR", body_part="CHEST")


def make_draft(text: str = "No acute cardiopulmonary abnormality.", probability=0.8,
               threshold=0.5, version: str = "0.1.0") -> DraftRecord:
    return DraftRecord(model_name="mrg-test", model_version=version, text=text,
                       probability=probability, threshold=threshold,
                       settings={"max_new_tokens": 64, "temperature": 0.0},
                       timings={"encode_s": 0.01, "generate_s": 0.2})


SHARED_SEEDS = (1, 2, 3)  # studies every writer saves: get-or-create is contended


def study_for(tag: str, i: int) -> Study:
    if i % 4 == 0:
        return make_study(SHARED_SEEDS[(i // 4) % len(SHARED_SEEDS)])
    return make_study(zlib.crc32(f"{tag}:{i}".encode()) + 1000)  # stable across processes


def main(argv: list[str]) -> int:
    url, n, tag = argv[0], int(argv[1]), argv[2]
    store = Store(url, busy_timeout_s=30.0)
    i = 0
    while n < 0 or i < n:
        study = study_for(tag, i)
        while True:
            try:
                r = store.save_review(study, make_draft(f"draft {tag} {i}"),
                                      f"final {tag} {i}", reviewer=f"writer-{tag}")
                break
            except StoreUnavailable as exc:  # what a user would do: press Save again
                print(f"retry {tag} {i}: {exc.detail}", file=sys.stderr, flush=True)
                time.sleep(0.05)
        print(r.correction_id, flush=True)  # acknowledged only after COMMIT
        i += 1
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
