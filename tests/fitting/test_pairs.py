"""Pair formats and pair builders (paper Appendix B.1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import char_tokenizer

from austeer_peft import as_text_pairs, pairs_from_answer_pool, pairs_from_choices
from austeer_peft.fitting.pairs import bag_of_words_encoder, nearest_wrong, wrong_answers


# ---------------------------------------------------------------------------------------------------- formats


def test_tuples_triples_and_dicts():
    assert as_text_pairs([("a good", "a bad")]) == [("a good", "a bad")]
    assert as_text_pairs([["Q:", " yes", " no"]]) == [("Q: yes", "Q: no")]
    assert as_text_pairs([{"prompt": "Q:", "chosen": " yes", "rejected": " no"}]) == [("Q: yes", "Q: no")]
    assert as_text_pairs([{"chosen": "yes", "rejected": "no"}]) == [("yes", "no")]
    assert as_text_pairs(iter([("x", "y")])) == [("x", "y")]


def test_trl_dataset_plain_and_conversational():
    from datasets import Dataset

    plain = Dataset.from_dict({"prompt": ["2+2=", "1+1="], "chosen": ["4", "2"], "rejected": ["5", "3"]})
    assert as_text_pairs(plain) == [("2+2=4", "2+2=5"), ("1+1=2", "1+1=3")]
    implicit = Dataset.from_dict({"chosen": ["good"], "rejected": ["bad"]})
    assert as_text_pairs(implicit) == [("good", "bad")]

    tokenizer = char_tokenizer()
    conversational = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": "2+2?"}]],
        "chosen": [[{"role": "assistant", "content": "4"}]],
        "rejected": [[{"role": "assistant", "content": "5"}]],
    })
    assert as_text_pairs(conversational, tokenizer) == [("<user>2+2?\n<assistant>4", "<user>2+2?\n<assistant>5")]
    with pytest.raises(ValueError, match="chat template"):
        as_text_pairs(conversational)
    with pytest.raises(ValueError, match="columns"):
        as_text_pairs(Dataset.from_dict({"text": ["a"], "label": [1]}))


def test_chat_template_renders_the_prompt_as_a_user_turn():
    tokenizer = char_tokenizer()
    assert as_text_pairs([("2+2?", " 4", " 5")], tokenizer, chat_template=True) == [
        ("<user>2+2?\n<assistant> 4", "<user>2+2?\n<assistant> 5")]
    with pytest.raises(ValueError, match="needs \\(prompt, chosen"):
        as_text_pairs([("a", "b")], tokenizer, chat_template=True)
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        as_text_pairs([("2+2?", " 4", " 5")], tokenizer, chat_template=True)


@pytest.mark.parametrize(
    "pairs, error, match",
    [
        ([], ValueError, "empty"),
        (None, TypeError, "list of pairs"),
        ("a, b", TypeError, "list of pairs"),
        (42, TypeError, "list of pairs"),
        ([("ok", "")], ValueError, r"Pair 0: the negative \(rejected\) text is empty"),
        ([("ok", "fine"), ("", "x")], ValueError, r"Pair 1: the positive \(chosen\) text is empty"),
        ([("ok", b"bytes")], TypeError, "must be a string"),
        ([(1, "x", "y")], TypeError, "prompt must be a string"),
        ([("only one",)], TypeError, "each pair must be"),
        ([{"question": "q"}], ValueError, "needs `chosen` and `rejected`"),
    ],
)
def test_bad_entries_say_what_to_fix(pairs, error, match):
    with pytest.raises(error, match=match):
        as_text_pairs(pairs)


# ---------------------------------------------------------------------------------------------------- choices


def test_pairs_from_choices_random_wrong_answer_is_seeded():
    prompts = [f"Q{i}:" for i in range(20)]
    choices = [[" a", " b", " c", " d"]] * 20
    labels = [i % 4 for i in range(20)]
    triples = pairs_from_choices(prompts, choices, labels, seed=1)
    assert triples == pairs_from_choices(prompts, choices, labels, seed=1)
    assert triples != pairs_from_choices(prompts, choices, labels, seed=2)
    for (prompt, correct, wrong), label in zip(triples, labels):
        assert correct == choices[0][label] and wrong != correct and wrong in choices[0]
    assert len({wrong for _, _, wrong in triples}) > 1


def test_pairs_from_choices_shared_choices_text_labels_and_all_negatives():
    triples = pairs_from_choices(["great film", "dull film"], [" positive", " negative"], [0, " negative"])
    assert triples == [("great film", " positive", " negative"), ("dull film", " negative", " positive")]
    every = pairs_from_choices(["Q:"], [["A", "B", "C"]], [1], negatives="all")
    assert every == [("Q:", "B", "A"), ("Q:", "B", "C")]


def test_pairs_from_choices_per_example_draw_does_not_depend_on_earlier_examples():
    prompts = [f"Q{i}:" for i in range(12)]
    choices = [" a", " b", " c", " d"]
    labels = [i % 4 for i in range(12)]
    triples = pairs_from_choices(prompts, choices, labels, seed=3, draw="per_example")
    for index, (prompt, correct, wrong) in enumerate(triples):
        options = [c for c in choices if c != correct]
        assert wrong == options[int(np.random.default_rng([3, index]).integers(3))]
    # the sequential draw of the later examples changes when an earlier one is dropped; the per-example one does not
    # for an example that keeps its index
    changed = pairs_from_choices(prompts[:6] + ["X:"] + prompts[7:], choices, labels, seed=3, draw="per_example")
    assert changed[:6] + changed[7:] == triples[:6] + triples[7:]
    two = pairs_from_choices(["q", "r"], [" yes", " no"], [1, 0], draw="per_example")
    assert two == [("q", " no", " yes"), ("r", " yes", " no")]
    with pytest.raises(ValueError, match="`draw` must be 'sequential' or 'per_example'"):
        pairs_from_choices(["q"], [" yes", " no"], [0], draw="each")


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((["q"], [["a", "b"]], [2]), ValueError, "out of range"),
        ((["q"], [["a", "b"]], ["c"]), ValueError, "not one of its choices"),
        ((["q"], [["a", "a"]], [0]), ValueError, "no wrong choice"),
        ((["q", "r"], [["a", "b"]], [0, 1]), ValueError, "choice lists"),
        ((["q"], [["a", "b"]], [0, 1]), ValueError, "labels"),
        (([], [], []), ValueError, "No prompts"),
        ((["q"], [["a", 3]], [0]), TypeError, "strings"),
    ],
)
def test_pairs_from_choices_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        pairs_from_choices(*args)


# ---------------------------------------------------------------------------------------------------- answer pool


def bag_of_letters(texts: list[str]) -> torch.Tensor:
    """A tiny deterministic 'sentence encoder': letter counts."""
    rows = torch.zeros(len(texts), 26)
    for row, text in enumerate(texts):
        for char in text.lower():
            if "a" <= char <= "z":
                rows[row, ord(char) - 97] += 1
    return rows


def test_answer_pool_negative_is_the_most_similar_wrong_answer():
    prompts = ["Q1:", "Q2:", "Q3:"]
    answers = ["abc", "xyz", "abd"]
    triples = pairs_from_answer_pool(prompts, answers, encoder=bag_of_letters)
    assert triples == [("Q1:", "abc", "abd"), ("Q2:", "xyz", "abc"), ("Q3:", "abd", "abc")]
    # A wider pool; answers equal after strip() are never negatives.
    pool = ["abc ", "abcd", "zzz"]
    assert pairs_from_answer_pool(["Q"], ["abc"], pool=pool, encoder=bag_of_letters) == [("Q", "abc", "abcd")]
    with pytest.raises(ValueError, match="at least two"):
        pairs_from_answer_pool(["Q"], ["abc"], encoder=bag_of_letters)
    with pytest.raises(ValueError, match="no answer different"):
        pairs_from_answer_pool(["Q", "R"], ["abc", "abc "], encoder=bag_of_letters)
    with pytest.raises(ValueError, match="one embedding row per text"):
        pairs_from_answer_pool(["Q", "R"], ["a", "b"], encoder=lambda texts: torch.zeros(1, 4))


def test_nearest_wrong_is_the_shared_rule_of_both_recipes():
    similarity = torch.tensor([[1.0, 0.5, 0.5, 0.9], [0.2, 1.0, 0.2, 0.1], [0.3, 0.3, 1.0, 0.3]])
    same = torch.tensor([[True, False, False, True], [False, True, False, False], [True, True, True, True]])
    # the highest unmasked column, the first on ties, None when every candidate is the same answer
    assert nearest_wrong(similarity, same) == [1, 0, None]
    problems = ["Tom has 3 apples.", "Tom has 5 apples.", "A car drives 60 miles."]
    assert wrong_answers(problems, [2.0, 3.0, 60.0]) == [3.0, 2.0, 2.0]
    from austeer_peft.evaluate import tasks

    assert tasks.wrong_answers is wrong_answers  # the tasks re-export the one implementation
    vectors = bag_of_words_encoder(["Tom has 3 apples", "tom HAS apples!", ""])
    assert vectors.shape == (3, 3)  # words: apples, has, tom; numbers and punctuation dropped
    torch.testing.assert_close(vectors[0], vectors[1])
    assert torch.equal(vectors[2], torch.zeros(3))


def test_default_encoder_picks_a_semantically_close_wrong_answer():
    prompts = ["How many apples are left?", "What colour is the sky?", "Where do penguins live?"]
    answers = ["There are 12 apples left.", "The sky is blue.", "Penguins live in Antarctica."]
    pool = answers + ["There are 7 apples left.", "The grass is green.", "Camels live in the desert."]
    triples = pairs_from_answer_pool(prompts, answers, pool=pool)
    assert [wrong for _, _, wrong in triples] == [
        "There are 7 apples left.", "The grass is green.", "Camels live in the desert."]

    from austeer_peft.fitting.pairs import default_sentence_encoder

    embeddings = default_sentence_encoder()(["hello world", "a cat"])
    assert embeddings.shape == (2, 384)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
