"""Poincare embeddings (part10, 10.4) of a hierarchy against Euclidean ones and, where gensim
is installed, against gensim's PoincareModel: reconstruction mean rank and MAP, wall time.

  python bench/poincare.py --hierarchy ../shared/data/wordnet_mammal_closure.tsv
  python bench/poincare.py --hierarchy ... --dims 5 --epochs 200 --gensim_epochs 200

Ours trains with part10's train_embedding (batched, Riemannian SGD) at part10's defaults
unless flags say otherwise; gensim (pip install gensim) with its defaults (negative 10,
alpha 0.1, burn-in 10 epochs at 0.01, batch 10) at --dims and --gensim_epochs. Both are
scored by the same reconstruction (gensim's ReconstructionEvaluation's definition, computed
by part10's `reconstruction`), each run alone in this process, one thread. Prints a table
and writes out/bench/poincare.json.
"""
import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hierarchy", required=True, help="a TSV of child<TAB>ancestor closure pairs")
    ap.add_argument("--dims", type=int, nargs="+", default=[2, 5, 10])
    ap.add_argument("--epochs", type=int, default=None, help="ours (default: part10's --poincare_epochs)")
    ap.add_argument("--lr", type=float, default=None, help="ours (default: part10's --poincare_lr)")
    ap.add_argument("--gensim_epochs", type=int, default=200)
    ap.add_argument("--out", default="out/bench/poincare.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    mod = importlib.import_module("part10_semantic")
    cfg = mod.Config(seed=0)
    cfg = mod.dataclasses.replace(cfg, poincare_epochs=args.epochs or cfg.poincare_epochs,
                                  poincare_lr=args.lr or cfg.poincare_lr)
    names, pairs = mod.index_hierarchy(mod.read_hierarchy(args.hierarchy), args.hierarchy)
    print(f"{args.hierarchy}: {len(names):,} nodes, {len(pairs):,} pairs; ours: {cfg.poincare_epochs} epochs, "
          f"lr {cfg.poincare_lr:g}, batch {cfg.poincare_batch}, {cfg.negatives} negatives, burn-in {cfg.burn_in}")
    rows = []
    print(f"{'model':<22} {'dim':>4} {'epochs':>7} {'mean rank':>10} {'MAP':>7} {'seconds':>8}")
    for dim in args.dims:
        runs = [("ours, Poincare", "poincare", mod.poincare_distance), ("ours, Euclidean", "euclidean",
                                                                      mod.euclidean_distance)]
        for label, geometry, distance in runs:
            t = time.perf_counter()
            weight = mod.train_embedding(len(names), pairs, dim, cfg, geometry)
            seconds = time.perf_counter() - t
            mean_rank, map_ = mod.reconstruction(weight, pairs, distance)
            rows.append({"model": label, "dim": dim, "epochs": cfg.poincare_epochs, "mean_rank": mean_rank,
                         "map": map_, "seconds": seconds})
            print(f"{label:<22} {dim:>4} {cfg.poincare_epochs:>7} {mean_rank:>10.2f} {map_:>7.3f} {seconds:>8.1f}",
                  flush=True)
        try:
            from gensim.models.poincare import PoincareModel, PoincareRelations
        except ImportError:
            continue
        t = time.perf_counter()
        model = PoincareModel(PoincareRelations(args.hierarchy), size=dim, negative=10, seed=0)
        model.train(epochs=args.gensim_epochs)
        seconds = time.perf_counter() - t
        weight = torch.from_numpy(np.stack([model.kv.get_vector(n) for n in names]).astype(np.float64))
        mean_rank, map_ = mod.reconstruction(weight, pairs, mod.poincare_distance)
        rows.append({"model": "gensim PoincareModel", "dim": dim, "epochs": args.gensim_epochs,
                     "mean_rank": mean_rank, "map": map_, "seconds": seconds})
        print(f"{'gensim PoincareModel':<22} {dim:>4} {args.gensim_epochs:>7} {mean_rank:>10.2f} {map_:>7.3f} "
              f"{seconds:>8.1f}", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": platform.processor() or platform.machine(), "hierarchy": args.hierarchy,
                   "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
