"""The paper's two head-level baselines, on the attention site's AUs split into heads (the input of the attention
output projection is the concatenation of the heads' outputs, ``[.., heads * head_dim]``).

* **ITI** (Li et al., 2023, "Inference-Time Intervention"; code: github.com/likenneth/honest_llama, ``utils.py``
  ``train_probes`` / ``get_com_directions`` / ``get_interventions_dict`` and ``lt_modulated_vector_add``): one
  logistic-regression probe per head on the pairs' last-token head activations (label 1 for the positive text, 0 for
  the negative; the pairs are split 80 / 20 into probe train / probe validation by a seeded permutation, as
  ``val_ratio=0.2``); the heads with the highest probe validation accuracy are steered by adding
  ``α · σ · θ`` where ``θ`` is the unit mass-mean direction ``mean(x_pos) - mean(x_neg)`` over all pairs and ``σ``
  the standard deviation of all activations (both labels) projected on ``θ``. Probes: scikit-learn's
  ``LogisticRegression(random_state=seed, max_iter=1000)``, as the reference code. Swept: the number of heads and α.
* **SADI-HEAD** (Wang et al., 2025b, "Semantics-Adaptive Dynamic Intervention"; code: github.com/weixuan-wang123/SADI,
  ``steering.py`` ``select_heads_acts_actups`` / ``steer_heads``): heads ranked by the mean over pairs, and over the
  head's dimensions, of ``x_pos - x_neg`` (largest first, signed, as the code's ``max_heads``); at inference every
  element of the chosen heads is multiplied by ``strength`` (``edit_head = strength * head``: input-adaptive, each
  element scales with its own activation). That is an AUSteer adapter with ``γ = strength - 1`` on every dimension of
  those heads. Swept: the number of heads (the code's 1, 2, 4, 6, 8, 10) and the strength (the code's 5..80).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..tuner.aus import AU
from .activations import PairActivations

ITI_HEADS = (4, 8, 16, 32, 48)  # the reference code's default is 48 heads (of 1024 in LLaMA-7B)
ITI_ALPHAS = (5.0, 10.0, 15.0, 20.0, 30.0)  # its default α is 15
SADI_HEADS = (1, 2, 4, 6, 8)
SADI_STRENGTHS = (2.0, 5.0, 10.0, 20.0, 50.0)
ITI_VALIDATION_FRACTION = 0.2


@dataclass
class ITIProbes:
    """What ITI derives from the pairs, per (attention module, head)."""

    modules: list[str]  # the attention site's modules, in model order
    accuracy: torch.Tensor  # [modules, heads] probe accuracy on the probe-validation pairs
    directions: torch.Tensor  # [modules, heads, head_dim] unit mass-mean directions
    sigma: torch.Tensor  # [modules, heads] std of the activations projected on the direction
    head_dim: int

    def top_heads(self, n: int) -> list[tuple[int, int]]:
        """The ``n`` (module index, head) of highest probe accuracy (ties: model order)."""
        check_count(n, self.accuracy.numel(), "heads")
        order = torch.sort(-self.accuracy.flatten(), stable=True).indices[:n].tolist()
        return [divmod(i, self.accuracy.shape[1]) for i in order]

    def vectors(self, n: int, alpha: float) -> dict[str, tuple[str, torch.Tensor]]:
        """ITI's intervention for the top ``n`` heads at strength ``alpha``: {module: ("input", vector [width])}."""
        width = self.accuracy.shape[1] * self.head_dim
        vectors: dict[str, tuple[str, torch.Tensor]] = {}
        for module, head in self.top_heads(n):
            name = self.modules[module]
            vector = vectors.setdefault(name, ("input", torch.zeros(width)))[1]
            shift = alpha * self.sigma[module, head] * self.directions[module, head]
            vector[head * self.head_dim:(head + 1) * self.head_dim] = shift
        return vectors


def iti_probes(activations: PairActivations, seed: int = 0,
               validation_fraction: float = ITI_VALIDATION_FRACTION) -> ITIProbes:
    """Train ITI's per-head probes and derive its directions and σ (see the module docstring)."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as error:
        raise ImportError("ITI's probes need scikit-learn: pip install 'austeer-peft[baselines]'.") from error
    modules = [m.name for m in activations.on_site("attention")]
    n = activations.num_pairs
    n_validation = int(round(validation_fraction * n))
    if n_validation < 1 or n - n_validation < 1:
        raise ValueError(f"ITI needs pairs for both probe training and probe validation; got {n} pairs.")
    order = np.random.default_rng(seed).permutation(n)
    train, validation = order[n_validation:], order[:n_validation]
    accuracy, directions, sigma = [], [], []
    for name in modules:
        positive, negative = activations.heads(name, True), activations.heads(name, False)  # [N, heads, head_dim]
        module_accuracy = []
        for head in range(positive.shape[1]):
            x_pos, x_neg = positive[:, head].double().numpy(), negative[:, head].double().numpy()
            features = np.concatenate([x_pos[train], x_neg[train]])
            labels = np.concatenate([np.ones(len(train)), np.zeros(len(train))])
            probe = LogisticRegression(random_state=seed, max_iter=1000).fit(features, labels)
            held_out = np.concatenate([x_pos[validation], x_neg[validation]])
            truth = np.concatenate([np.ones(len(validation)), np.zeros(len(validation))])
            module_accuracy.append(float((probe.predict(held_out) == truth).mean()))
        mass_mean = positive.mean(0) - negative.mean(0)  # [heads, head_dim], over all pairs
        unit = mass_mean / mass_mean.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        both = torch.cat([positive, negative])  # [2N, heads, head_dim]
        projections = torch.einsum("nhd,hd->nh", both, unit)
        accuracy.append(torch.tensor(module_accuracy))
        directions.append(unit)
        sigma.append(projections.std(0, unbiased=False))  # np.std, as the reference code
    return ITIProbes(modules, torch.stack(accuracy), torch.stack(directions), torch.stack(sigma),
                     activations.head_dim)


def sadi_head_ranking(activations: PairActivations) -> list[tuple[str, int]]:
    """(module, head) pairs ranked by the mean over pairs and head dimensions of ``x_pos - x_neg``, largest first
    (ties: model order)."""
    modules = [m.name for m in activations.on_site("attention")]
    scores = torch.stack([(activations.heads(name, True) - activations.heads(name, False)).mean(dim=(0, 2))
                          for name in modules])  # [modules, heads]
    order = torch.sort(-scores.flatten(), stable=True).indices.tolist()
    return [(modules[i // scores.shape[1]], i % scores.shape[1]) for i in order]


def sadi_head_aus(ranking: list[tuple[str, int]], n: int, strength: float, head_dim: int) -> list[AU]:
    """SADI-HEAD's steer as AUs: every dimension of the top ``n`` heads scaled by ``strength`` (γ = strength - 1)."""
    check_count(n, len(ranking), "heads")
    if not strength > 0:
        raise ValueError(f"SADI's strength multiplies activations and must be > 0, got {strength!r}.")
    return [AU(module, head * head_dim + dim, float(strength) - 1.0)
            for module, head in ranking[:n] for dim in range(head_dim)]


def check_count(n: int, available: int, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= available:
        raise ValueError(f"The number of {what} must be an integer in [1, {available}], got {n!r}.")
