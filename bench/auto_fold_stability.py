"""How much holding pairs out changes the steer they are scored under, and how much that matters on test.

For the folds `fit_austeer(k="auto")` makes (by default one held-out pair at a time), it prints for each k of the
automatic grid how many of the top-k AUs of ``all counts - fold counts`` are among the top-k of all counts (the steer
that ships), as min / median / max over the folds. ``--scores`` is the scores.safetensors of `austeer sweep` on the
same fit split (counts of all fit pairs); only the folds are counted here.

With ``--cell K ALPHA --n-test N`` it also scores on the first N test examples the shipped steer of that cell, the
steers of the first ``--fold-steers`` folds, and ``--tie-breaks`` steers that differ from the shipped one only in
which AUs of equal score are taken (a random order among ties instead of model order). Large differences mean that a
held-out score of one steer says little about another steer of the same (k, α).

    python bench/auto_fold_stability.py --task boolq --n-fit 300 --scores out-boolq/scores.safetensors --folds 4 \\
        --sites ffn --cell 64 20 --n-test 200
"""

from __future__ import annotations

import argparse
import statistics

import torch

from austeer_peft import compute_momentum
from austeer_peft.fitting.auto import AUTO_KS, split_folds
from austeer_peft.evaluate import load_task
from austeer_peft.evaluate.runner import evaluate_split
from austeer_peft import AU
from austeer_peft.fitting.scores import MomentumScores, adaptive_gamma
from austeer_peft.hub.models import load_model
from austeer_peft.fitting.pairs import as_text_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", required=True)
    parser.add_argument("--n-fit", type=int)
    parser.add_argument("--scores", required=True, help="scores.safetensors of `austeer sweep` on the same fit split")
    parser.add_argument("--sites", nargs="+", default=["attention", "ffn"])
    parser.add_argument("--folds", type=int, help="as auto_folds of fit_austeer (default: one pair at a time)")
    parser.add_argument("--cell", nargs=2, type=float, metavar=("K", "ALPHA"), help="score this cell's steers on test")
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--fold-steers", type=int, default=4)
    parser.add_argument("--tie-breaks", type=int, default=3)
    args = parser.parse_args()

    task = load_task(args.task, n_fit=args.n_fit)
    task.test = task.test.select(range(min(args.n_test, len(task.test))))
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
            shipped = au_set(total.select(k, 1.0))
            shared = [len(shipped & au_set((total - counts).select(k, 1.0))) for counts in fold_counts]
            print(f"{site:<10} k={k:<3} top-k AUs shared with the shipped steer over {len(folds)} folds: min "
                  f"{min(shared)}, median {statistics.median(shared):g}, max {max(shared)} of {k}", flush=True)
        if args.cell is not None:
            model = score_steers(model, tokenizer, task, total, fold_counts, int(args.cell[0]), args.cell[1], args)


def au_set(aus: list[AU]) -> set[tuple[str, int]]:
    return {(au.module, au.dim) for au in aus}


def score_steers(model, tokenizer, task, total, fold_counts, k, alpha, args):
    """Test accuracy of the shipped steer, some fold steers and some random tie-breaks; returns the base model."""
    peft_model = total.to_adapter(k, alpha, model)
    shipped = total.select(k, alpha)
    with peft_model.disable_adapter():
        print(f"  unsteered: test {100 * evaluate_split(peft_model, tokenizer, task, 'test').accuracy:.1f} %")
    steers = [("shipped", shipped)]
    steers += [(f"fold {i} steer", (total - counts).select(k, alpha))
               for i, counts in enumerate(fold_counts[:args.fold_steers])]
    steers += [(f"random tie-break {seed}", random_tie_break(total, k, alpha, seed)) for seed in range(args.tie_breaks)]
    for label, aus in steers:
        peft_model.set_aus(aus)
        accuracy = evaluate_split(peft_model, tokenizer, task, "test").accuracy
        print(f"  ({k}, {alpha:g}) {label}: test {100 * accuracy:.1f} % on {len(task.test)}, "
              f"{len(au_set(aus) & au_set(shipped))} of {k} AUs shared with the shipped steer", flush=True)
    return peft_model.unload()


def random_tie_break(scores: MomentumScores, k: int, alpha: float, seed: int) -> list[AU]:
    """The top-k AUs by score as ``select`` takes them, but among equal scores in a random order."""
    generator = torch.Generator().manual_seed(seed)
    candidates = []  # (score, random key, module, dim)
    for module in scores.modules:
        score = scores.score(module.name)
        keys = torch.rand(len(score), generator=generator)
        candidates += zip(score.tolist(), keys.tolist(), [module.name] * len(score), range(len(score)))
    top = sorted(candidates, key=lambda c: (-c[0], c[1]))[:k]
    return [AU(name, dim, adaptive_gamma(int(scores.n_pos[name][dim]), int(scores.n_neg[name][dim]),
                                         scores.num_pairs, alpha))
            for _, _, name, dim in top]


if __name__ == "__main__":
    main()
