"""The paper's Table 3 ablations of AUSteer (Section 5.3): each changes one part and keeps the rest.

AUSteer = localization by activation momentum (top-k AUs by ``s = max(r_pos, r_neg)``) + adaptive steering
``x̂_i = x_i + γ_i x_i`` with ``γ_i = α·r_pos`` if ``r_pos > r_neg`` else ``-α·r_neg`` (Eqs. 3-4). The ablations:

=================  ============================================================================================
random AUs         k AUs drawn uniformly (seeded) from the site's candidates, AUSteer's γ from their counts
mean-diff AUs      the top-k AUs by ``|mean_j (x_pos_j - x_neg_j)|`` (SADI's localization), AUSteer's γ
fixed vector       AUSteer's top-k AUs, ``γ_i x_i`` replaced by ``α · d_i`` with ``d_i`` the mean activation
                   difference (the paper: "replaces γ_i x_i with the mean activation difference, following ITI")
fixed strength     AUSteer's top-k AUs, ``γ_i = ±α`` (the sign of AUSteer's γ) instead of ``α · r``
=================  ============================================================================================

All four share AUSteer's (k, α) grid, pairs, splits and selection rule; only "fixed vector" adds instead of scaling,
so it runs through :func:`~austeer_peft.evaluate.baselines.added_vectors`, the others are AUSteer adapters.
"""

from __future__ import annotations

import torch

from ..fitting.scores import MomentumScores, adaptive_gamma, check_alpha
from ..tuner.aus import AU
from .activations import PairActivations
from .heads import check_count

ABLATIONS = ("random", "mean-diff", "fixed-vector", "fixed-strength")


def _aus_at(scores: MomentumScores, positions: list[int], gamma) -> list[AU]:
    """AUs at flat positions (model order over ``scores.modules``) with ``gamma(n_pos, n_neg)``."""
    names = [m.name for m in scores.modules]
    starts = torch.tensor([0] + [m.width for m in scores.modules]).cumsum(0)
    aus = []
    for position in positions:
        module = int(torch.searchsorted(starts, position, right=True)) - 1
        dim = position - int(starts[module])
        name = names[module]
        aus.append(AU(name, dim, gamma(int(scores.n_pos[name][dim]), int(scores.n_neg[name][dim]))))
    return aus


def random_aus(scores: MomentumScores, k: int, alpha: float, seed: int = 0) -> list[AU]:
    """``k`` AUs drawn uniformly without replacement (one seeded permutation: the k AUs are a prefix of the
    k' > k ones), each with AUSteer's adaptive γ."""
    alpha = check_alpha(alpha)
    check_count(k, scores.num_aus, "AUs")
    order = torch.randperm(scores.num_aus, generator=torch.Generator().manual_seed(seed))[:k].tolist()
    return _aus_at(scores, order, lambda pos, neg: adaptive_gamma(pos, neg, scores.num_pairs, alpha))


def mean_difference_ranking(scores: MomentumScores, activations: PairActivations) -> list[int]:
    """Flat AU positions of ``scores`` ranked by ``|mean activation difference|``, largest first (ties: model order)."""
    differences = torch.cat([activations.mean_difference(m.name) for m in scores.modules]).abs()
    return torch.sort(-differences, stable=True).indices.tolist()


def mean_difference_aus(scores: MomentumScores, ranking: list[int], k: int, alpha: float) -> list[AU]:
    """The top-``k`` AUs of ``ranking`` (:func:`mean_difference_ranking`) with AUSteer's adaptive γ."""
    alpha = check_alpha(alpha)
    check_count(k, len(ranking), "AUs")
    return _aus_at(scores, ranking[:k], lambda pos, neg: adaptive_gamma(pos, neg, scores.num_pairs, alpha))


def fixed_strength_aus(scores: MomentumScores, k: int, alpha: float) -> list[AU]:
    """AUSteer's top-``k`` AUs with ``γ = +α`` where AUSteer's γ is positive and ``-α`` where it is negative."""
    return [AU(au.module, au.dim, alpha if au.gamma > 0 else -alpha) for au in scores.select(k, alpha)]


def fixed_vector(scores: MomentumScores, activations: PairActivations, k: int, alpha: float
                 ) -> dict[str, tuple[str, torch.Tensor]]:
    """AUSteer's top-``k`` AUs shifted by ``α · d_i`` (a fixed vector, the same for every input), as
    ``{module: (side, vector [width])}`` for :func:`~austeer_peft.evaluate.baselines.added_vectors`."""
    alpha = check_alpha(alpha)
    sides = {m.name: (m.position, m.width) for m in scores.modules}
    vectors: dict[str, tuple[str, torch.Tensor]] = {}
    for au in scores.select(k, alpha):
        side, width = sides[au.module]
        vector = vectors.setdefault(au.module, (side, torch.zeros(width)))[1]
        vector[au.dim] = alpha * activations.mean_difference(au.module)[au.dim]
    return vectors
