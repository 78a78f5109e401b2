"""One decode step of the default model's LM per precision and number of rows, alternated.

    python bench/decode_steps.py --precisions int8-weights int4-weights \
        --json bench/results/cpu_decode_steps_int4.json

A row is one sequence in the step: a guided draft is 2 rows, several users' drafts share one
step (models/step_batcher.py), so 8 or 16 rows is the app under load. On a shared 2-core machine
whole-draft timings of two runs differ by 15 % and more; here the precisions take turns, step
block by step block, in one process, and the medians of the blocks are compared.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import emit  # noqa: E402
from mrg_core.models import ReportModel  # noqa: E402
from mrg_core.models.quantize import PRECISIONS, apply_precision  # noqa: E402
from mrg_core.paths import DEFAULT_MODEL_DIR  # noqa: E402


def step_times(decoders: dict, rows: tuple[int, ...], rounds: int, steps: int,
               prompt: int = 60) -> dict:
    """Median milliseconds of one step, per (precision, rows), the precisions in turn."""
    vocab, width = next(iter(decoders.values())).model.embed_tokens.weight.shape
    times: dict = {(p, r): [] for p in decoders for r in rows}
    gen = torch.Generator().manual_seed(0)
    for _ in range(rounds):
        for r in rows:
            embeds = torch.randn(r, prompt, width, generator=gen) * 0.02
            tokens = torch.randint(0, vocab, (r,), generator=gen)
            for p, dec in decoders.items():
                _, cache = dec.prefill(embeds)
                dec.step(tokens, cache)  # first call: allocations
                t = time.perf_counter()
                for _ in range(steps):
                    dec.step(tokens, cache)
                times[(p, r)].append((time.perf_counter() - t) / steps * 1e3)
    return {f"{p}/rows={r}": statistics.median(v) for (p, r), v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS,
                    default=["int8-weights", "int4-weights"])
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2, 8, 16])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="steps per block")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    decoders = {}
    for p in args.precisions:
        model = apply_precision(ReportModel.from_pretrained(args.model), p)
        decoders[p] = model._decoder()  # the decoder a draft uses
    if not all(hasattr(d, "prefill") and hasattr(d, "model") for d in decoders.values()):
        raise SystemExit("the model's LM has no lean decoder (models/fast_llama.py)")
    ms = step_times(decoders, tuple(args.rows), args.rounds, args.steps)
    base = args.precisions[0]
    emit({"model": str(args.model), "torch_threads": torch.get_num_threads(),
          "rounds": args.rounds, "steps_per_block": args.steps, "step_ms": ms,
          f"speedup_over_{base}": {k: ms[f"{base}/{k.split('/')[1]}"] / v
                                   for k, v in ms.items()}}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
