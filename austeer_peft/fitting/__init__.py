"""Fitting AUSteer: contrastive pairs -> activation-momentum counts -> MomentumScores -> an adapter.

pairs.py (pair formats), inputs.py (tokenize, pad, batch, devices, process sharding), counter.py (the hooks that count),
scores.py (MomentumScores: counts algebra, top-k, γ, files), adapter.py (AUs -> PeftModel), logprobs.py (continuation
log-probabilities), selection.py (which steer ships, or none), fit.py (fit_austeer, compute_momentum) and auto.py
(the automatic (k, α)). Nothing here imports austeer_peft.evaluate or austeer_peft.cli.
"""
