"""Scoring functions on hand-made logits and texts, with hand-computed expected values."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from austeer_peft.evaluate import scoring as S

# Vocabulary of 4 tokens; the two choices are tokens 1 and 3.
LOGITS = torch.tensor([
    [0.0, 5.0, 1.0, 2.0],  # greedy = 1 (choice 0); among choices 5 > 2 -> choice 0
    [3.0, 0.0, 1.0, 2.5],  # greedy = 0 (no choice); among choices 0 < 2.5 -> choice 1
    [0.0, 1.0, 4.0, 0.0],  # greedy = 2 (no choice); among choices 1 > 0 -> choice 0
    [0.0, 1.0, 1.0, 3.0],  # greedy = 3 (choice 1); among choices -> choice 1
])
CHOICE_IDS = [1, 3]
LABELS = [0, 1, 1, 0]


# ------------------------------------------------------------------------------------------------ choices


def test_greedy_whole_vocabulary():
    assert S.greedy_choice_predictions(LOGITS, CHOICE_IDS) == [0, -1, -1, 1]
    assert S.greedy_choice_correct(LOGITS, CHOICE_IDS, LABELS) == [True, False, False, False]


def test_restricted_first_token():
    assert S.restricted_choice_predictions(LOGITS, CHOICE_IDS) == [0, 1, 0, 1]
    assert S.restricted_choice_correct(LOGITS, CHOICE_IDS, LABELS) == [True, True, False, False]
    assert S.restricted_choice_correct(LOGITS, torch.tensor(CHOICE_IDS), torch.tensor(LABELS)) == \
        [True, True, False, False]


def test_per_example_choice_ids_and_ties():
    per_example = torch.tensor([[1, 3], [0, 3], [2, 1], [3, 1]])
    assert S.greedy_choice_correct(LOGITS, per_example, [0, 0, 0, 0]) == [True, True, True, True]
    assert S.restricted_choice_predictions(LOGITS, per_example) == [0, 0, 0, 0]
    tied = torch.tensor([[2.0, 2.0, 0.0]])
    assert S.restricted_choice_predictions(tied, [1, 0]) == [0]  # ties: the first choice
    assert S.greedy_choice_predictions(tied, [1, 0]) == [1]  # ties: the lowest token id (0), i.e. choice 1


def test_choice_input_checks():
    with pytest.raises(ValueError, match="last token"):
        S.greedy_choice_correct(LOGITS.unsqueeze(1), CHOICE_IDS, LABELS)
    with pytest.raises(ValueError, match="labels"):
        S.restricted_choice_correct(LOGITS, CHOICE_IDS, [0, 1])
    with pytest.raises(ValueError, match="choice_ids"):
        S.greedy_choice_predictions(LOGITS, [1, 7])


def test_continuation_logprobs_hand_computed():
    # Two tokens. Logits [ln 3, 0] give p = (3/4, 1/4); zeros give (1/2, 1/2).
    ln3 = math.log(3.0)
    logits = torch.tensor([
        [[ln3, 0.0], [0.0, 0.0], [ln3, 0.0]],
        [[0.0, 0.0], [ln3, 0.0], [0.0, 0.0]],
    ])
    input_ids = torch.tensor([[1, 0, 1], [0, 1, 0]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    # row 0: token 0 after logits[0] -> log 3/4; token 1 after logits[1] -> log 1/2
    # row 1: only position 2: token 0 after logits[1] -> log 3/4
    expected = torch.tensor([math.log(0.75) + math.log(0.5), math.log(0.75)])
    assert torch.allclose(S.continuation_logprobs(logits, input_ids, mask), expected, atol=1e-6)
    with pytest.raises(ValueError, match="position 0"):
        S.continuation_logprobs(logits, input_ids, torch.ones_like(mask))


def test_loglik_choice():
    scores = [[-3.0, -1.5, -2.0], [-0.1, -4.0, -0.1], [-9.0, -8.0, -7.0]]
    assert S.loglik_choice_predictions(scores) == [1, 0, 2]
    assert S.loglik_choice_correct(torch.tensor(scores), [1, 2, 2]) == [True, False, True]
    # Examples with different numbers of options (per-row choices); ties go to the first option.
    assert S.loglik_choice_predictions([[-3.0, -1.0], [-2.0, -5.0, -0.5, -4.0], [-1.0, -1.0, -2.0]]) == [1, 2, 0]


# ------------------------------------------------------------------------------------------------ numbers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 42.", 42.0),
        ("He has 3 apples, then 5.", 5.0),
        ("Total: 1,234,567 dollars", 1234567.0),
        ("1,234.5", 1234.5),
        ("It drops to -7 degrees", -7.0),
        ("x = -3.25", -3.25),
        ("(\u22124)", -4.0),
        ("10-4", 4.0),
        ("costs .5 dollars", 0.5),
        ("about 2. Then", 2.0),
        ("numbers 1, 2, 3", 3.0),
        ("$ 0.0001", 0.0001),
        ("no digits here", None),
        ("", None),
    ],
)
def test_parse_last_number(text, expected):
    assert S.parse_last_number(text) == expected


def test_number_matches_and_generation_correct():
    assert S.number_matches(" 51", 51.0)
    assert S.number_matches("So the answer is 51.00004", 51.0)  # within 1e-4
    assert not S.number_matches("So the answer is 51.001", 51.0)
    assert not S.number_matches("nothing", 0.0)
    assert S.number_matches(" 6\n\nQuestion: 7 more", 6.0, stop=["\n\n"])
    assert not S.number_matches(" 6\n\nQuestion: 7 more", 6.0)
    assert S.generation_correct([" 1,000", " -2", "3"], [1000, -2.0, 4]) == [True, True, False]
    with pytest.raises(ValueError):
        S.generation_correct(["1"], [1, 2])


# ------------------------------------------------------------------------------------------------ statistics


def test_accuracy():
    assert S.accuracy([True, False, True, True]) == 0.75
    with pytest.raises(ValueError):
        S.accuracy([])


def test_bootstrap_ci():
    correct = [True] * 60 + [False] * 40
    mean, low, high = S.bootstrap_ci(correct)
    assert mean == 0.6
    assert low < mean < high
    assert 0.48 < low < 0.55 and 0.65 < high < 0.72  # about 0.6 +- 1.96 * sqrt(0.24 / 100) = 0.6 +- 0.096
    assert S.bootstrap_ci(correct) == (mean, low, high)  # deterministic
    assert S.bootstrap_ci(correct, seed=1) != (mean, low, high)
    assert S.bootstrap_ci([True] * 10) == (1.0, 1.0, 1.0)
    assert S.bootstrap_ci([False] * 10) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        S.bootstrap_ci([])


def test_paired_test_hand_computed():
    def results(b, c, both=3, neither=2):
        a = [True] * b + [False] * c + [True] * both + [False] * neither
        other = [False] * b + [True] * c + [True] * both + [False] * neither
        return a, other

    assert S.paired_test(*results(5, 0)) == pytest.approx(2 / 32)  # 2 * C(5,0) / 2^5
    assert S.paired_test(*results(0, 5)) == pytest.approx(2 / 32)
    assert S.paired_test(*results(8, 2)) == pytest.approx(2 * (1 + 10 + 45) / 1024)  # 0.109375
    assert S.paired_test(*results(2, 8)) == S.paired_test(*results(8, 2))
    assert S.paired_test(*results(1, 1)) == 1.0  # min(1, 2 * 3/4)
    assert S.paired_test(*results(0, 0)) == 1.0  # no discordant pair
    assert S.paired_test(*results(10, 3)) == pytest.approx(2 * (1 + 13 + 78 + 286) / 8192)  # 0.0922851...
    tiny = S.paired_test(*results(600, 400))  # z ~ 6.3 -> p ~ 3e-10
    assert 1e-11 < tiny < 1e-8
    with pytest.raises(ValueError):
        S.paired_test([True], [True, False])


# ------------------------------------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny word-level tokenizer that keeps a leading space with its word (as GPT-2 style BPE does)."""
    words = ["Answer", ":", "\n", "A", "B", " yes", " no", " positive", " negative", " please", " sir", "Review",
             "Answers", "s"]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?\w+|\n|[^\w\s]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_choice_token_ids(tokenizer):
    vocab = tokenizer.get_vocab()
    assert S.choice_token_ids(tokenizer, [" yes", " no"]) == [vocab[" yes"], vocab[" no"]]
    assert S.choice_token_ids(tokenizer, ["A", "B"], prompt="Answer:\n") == [vocab["A"], vocab["B"]]
    assert S.choice_token_ids(tokenizer, [" negative", " positive"], prompt="Review: x\nSentiment:") == \
        [vocab[" negative"], vocab[" positive"]]


def test_choice_token_ids_errors(tokenizer):
    with pytest.raises(ValueError, match="share their first token"):
        S.choice_token_ids(tokenizer, [" yes please", " yes sir"])
    with pytest.raises(ValueError, match="merges"):
        S.choice_token_ids(tokenizer, ["s", " no"], prompt="Answer")  # "Answer" + "s" -> one token "Answers"
    with pytest.raises(ValueError, match="adds no token"):
        S.choice_token_ids(tokenizer, ["", " no"])


def test_paired_gain_interval_brackets_the_mean_gain():
    vanilla = [True] * 180 + [False] * 120
    steered = [False] * 10 + [True] * 170 + [True] * 40 + [False] * 80  # 40 wins, 10 losses
    gain, low, high = S.paired_gain_ci(steered, vanilla)
    assert gain == pytest.approx(30 / 300) and low < gain < high and low > 0
    assert S.paired_gain_ci(vanilla, vanilla) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same examples"):
        S.paired_gain_ci([True], [True, False])


def test_forward_logits_hands_the_lm_head_a_contiguous_input_and_leaves_no_hook():
    """With logits_to_keep the head would get a strided [B, 1, H] slice, on which PyTorch's CPU matmul is very slow
    (bench/RESULTS.md); forward_logits copies it, with the same logits, and removes its hook afterwards."""
    from conftest import tiny_model

    from austeer_peft.fitting.logprobs import forward_logits

    model = tiny_model("llama")
    head = model.get_output_embeddings()
    seen, forward = [], head.forward
    head.forward = lambda x: seen.append(x.is_contiguous()) or forward(x)  # what the head's matmul gets
    batch = {"input_ids": torch.randint(1, 50, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long),
             "position_ids": torch.arange(7).expand(3, 7)}
    with torch.no_grad():
        kept = forward_logits(model, batch, keep=1)
        full = model(**batch).logits
        model(**batch, logits_to_keep=1)  # outside forward_logits: the strided slice, as transformers makes it
    assert seen == [True, True, False] and not head._forward_pre_hooks
    torch.testing.assert_close(kept[:, -1], full[:, -1], rtol=1e-5, atol=1e-6)
