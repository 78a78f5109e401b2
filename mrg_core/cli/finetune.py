"""python -m mrg_core finetune --from-db URL --base MODEL_DIR [--out DIR]
                              [--adapter lora|prefix|none] [--epochs N]
                              [--min-corrections N] [--holdout time|kfold] ...

Fine-tunes the model in --base on the radiologists' corrections stored in the database and
writes a NEW model version folder (default: $MRG_MODELS_DIR or <repo>/models/<name>-<version>)
with lineage.json and finetune_metrics.md (held-out before/after). Exit status 2 when the
database holds too few corrected studies.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mrg_core finetune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-db", required=True, metavar="URL",
                    help="SQLAlchemy URL of the correction store, e.g. sqlite:///mrg_studio.db")
    ap.add_argument("--base", required=True, help="parent model folder (save_pretrained)")
    ap.add_argument("--out", help="new model folder (must not exist or be empty)")
    ap.add_argument("--exclude-model", action="append",
                    help="leave out corrections drafted by this model name (repeatable; "
                         "default: the app's other routed models, e.g. the radiograph model)")
    ap.add_argument("--adapter", default="lora", choices=["lora", "prefix", "none"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--train-encoder", action="store_true",
                    help="also train the image encoder and classifier (changes probabilities)")
    ap.add_argument("--min-corrections", type=int, default=10)
    ap.add_argument("--holdout", default="time", choices=["time", "kfold"])
    ap.add_argument("--holdout-fraction", type=float, default=0.2)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--covctr-split", choices=["val", "test"],
                    help="also score before/after on this COV-CTR split (shared data)")
    ap.add_argument("--covctr-limit", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--include-accepted", action="store_true",
                    help="also train on drafts saved unchanged ('accepted as drafted'; left out "
                         "by default: they are the parent model's own text)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, help="torch CPU threads (a busy machine: 1)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from mrg_core.storage import Store, StoreUnavailable

    store = Store(args.from_db)
    try:
        # cheap count first: no torch import and no image decoding when there is nothing to do
        stats = store.stats()
        n = stats["corrections"] - (0 if args.include_accepted else stats["accepted"])
    except StoreUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if n < args.min_corrections:
        print(f"Too few corrections to fine-tune: {n} in {args.from_db}, at least "
              f"{args.min_corrections} needed (--min-corrections).", file=sys.stderr)
        return 2

    import torch

    from mrg_core.finetune import FinetuneConfig, TooFewCorrections, finetune_from_store

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = FinetuneConfig(adapter=args.adapter, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                         train_encoder=args.train_encoder, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size, seed=args.seed, holdout=args.holdout,
                         holdout_fraction=args.holdout_fraction, k=args.k,
                         min_corrections=args.min_corrections, covctr_split=args.covctr_split,
                         covctr_limit=args.covctr_limit, device=args.device,
                         include_accepted=args.include_accepted)
    try:
        res = finetune_from_store(store, args.base, args.out, cfg,
                                  exclude_models=_other_models(args))
    except TooFewCorrections as e:  # counted per study: several edits of one study count once
        print(f"Too few corrections to fine-tune: {e}", file=sys.stderr)
        return 2
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    held = res.metrics["heldout"]
    print((res.path / "finetune_metrics.md").read_text(), file=sys.stderr)
    print(json.dumps({"path": str(res.path), "version": res.version,
                      "parent_version": res.parent_version, "n_train": len(res.train_ids),
                      "n_heldout": len(res.heldout_ids),
                      "token_f1_before": held["before"].get("token_f1"),
                      "token_f1_after": held["after"].get("token_f1"),
                      "seconds": res.seconds}))
    return 0


def _other_models(args) -> set[str]:
    """Names of models whose corrections this fine-tune leaves out: --exclude-model, else the
    app's other routed models (the chest radiograph model), never the base itself."""
    from mrg_core.engine import EngineSettings
    from mrg_core.registry import read_model_version

    if args.exclude_model is not None:
        names = set(args.exclude_model)
    else:
        found = (read_model_version(d) for d in EngineSettings.from_env().extra_model_dirs)
        names = {mv.name for mv in found if mv is not None}
    base = read_model_version(args.base)
    return names - {base.name} if base is not None else names
