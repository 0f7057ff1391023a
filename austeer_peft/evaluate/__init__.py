"""Evaluation data and scoring for AUSteer: the paper's tasks as uniform :class:`Task` objects with deterministic
splits and contrastive pairs, and model-free scoring functions (accuracy, bootstrap CIs, paired tests)."""

from .scoring import (
    accuracy,
    bootstrap_ci,
    choice_token_ids,
    continuation_logprobs,
    generation_correct,
    greedy_choice_correct,
    greedy_choice_predictions,
    loglik_choice_correct,
    loglik_choice_predictions,
    number_matches,
    paired_test,
    parse_last_number,
    restricted_choice_correct,
    restricted_choice_predictions,
)
from .runner import SCORINGS, SplitResult, default_scoring, evaluate_split
from .tasks import (
    TASK_NAMES,
    ContrastivePair,
    Task,
    format_number,
    load_task,
    load_user_task,
    resolve_data_dir,
    wrong_answers,
)

__all__ = [
    "SCORINGS",
    "SplitResult",
    "TASK_NAMES",
    "ContrastivePair",
    "Task",
    "accuracy",
    "bootstrap_ci",
    "choice_token_ids",
    "continuation_logprobs",
    "default_scoring",
    "evaluate_split",
    "format_number",
    "generation_correct",
    "greedy_choice_correct",
    "greedy_choice_predictions",
    "load_task",
    "load_user_task",
    "loglik_choice_correct",
    "loglik_choice_predictions",
    "number_matches",
    "paired_test",
    "parse_last_number",
    "resolve_data_dir",
    "restricted_choice_correct",
    "restricted_choice_predictions",
    "wrong_answers",
]
