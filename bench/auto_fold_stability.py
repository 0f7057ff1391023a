"""How much of the top-k a held-out fold changes: the steer a fold is scored under (counted without the fold) against
the steer the chosen cell ships (counted on all pairs), for the folds `fit_austeer(k="auto")` would make.

For each fold and each k of the automatic grid it prints how many of the top-k AUs of ``all counts - fold counts``
are among the top-k of all counts. Few shared AUs mean the folds score other steers than the one that ships, and the
held-out accuracies cannot rank the shipped cells. ``--scores`` is the scores.safetensors of `austeer sweep` on the
same fit split (counts of all fit pairs); only the folds are counted here.

    python bench/auto_fold_stability.py --task boolq --n-fit 300 --scores out-boolq/scores.safetensors
"""

from __future__ import annotations

import argparse

from austeer_peft import compute_momentum
from austeer_peft.auto import AUTO_KS, DEFAULT_FOLDS, split_folds
from austeer_peft.evaluate import load_task
from austeer_peft.momentum import MomentumScores
from austeer_peft.models import load_model
from austeer_peft.pairs import as_text_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", required=True)
    parser.add_argument("--n-fit", type=int)
    parser.add_argument("--scores", required=True, help="scores.safetensors of `austeer sweep` on the same fit split")
    parser.add_argument("--sites", nargs="+", default=["attention", "ffn"])
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS)
    args = parser.parse_args()

    task = load_task(args.task, n_fit=args.n_fit)
    model, tokenizer = load_model(args.model)
    _, folds = split_folds(as_text_pairs(task.pairs("fit"), tokenizer), args.folds)
    saved = MomentumScores.load(args.scores)
    for site in args.sites:
        fold_counts = [compute_momentum(model, tokenizer, fold, sites=[site], progress=False) for fold in folds]
        names = [module.name for module in fold_counts[0].modules]
        total = MomentumScores(fold_counts[0].modules, {name: saved.n_pos[name] for name in names},
                               {name: saved.n_neg[name] for name in names}, saved.num_pairs,
                               saved.model_type, [site])
        for k in AUTO_KS:
            shipped = {(au.module, au.dim) for au in total.select(k, 1.0)}
            shared = [len(shipped & {(au.module, au.dim) for au in (total - counts).select(k, 1.0)})
                      for counts in fold_counts]
            print(f"{site:<10} k={k:<3} top-k AUs shared with the shipped steer, per fold: "
                  f"{' '.join(str(n) for n in shared)} of {k}")


if __name__ == "__main__":
    main()
