"""WinoGrande 1.1 (Sakaguchi et al., 2020): fill the blank ``_`` of a sentence with one of two options.

Prompt: the SADI code's template (:data:`WINOGRANDE_TEMPLATE`), as the data README gives it for the paper, whose
Appendix B does not print it. Choices: ``" A"`` / ``" B"`` (option1 / option2), the letters that template asks for,
rather than the option texts: the restricted first-token scoring needs the two choices to start with different
tokens, which two option texts need not do (two names or nouns can share their first sub-word token).

Splits: fit (1000, the paper's 1000 pairs) and validation (200) drawn disjointly, by a seeded permutation, from
train_xl_first2000.jsonl (the first 2000 items of the ``winogrande_xl`` train split); test = the official dev set
dev.jsonl (1267 items, the paper's test set). Train items come in twins (the same sentence with one word changed and
the other answer), which a permutation may put on both sides of fit / validation; the test set is separate.

Without a local data folder the same items come from the Hub (``allenai/winogrande``, ``winogrande_xl``: the first
2000 of its train split and its validation split, the official dev set), so the splits and prompts are the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from datasets import Dataset

from .base import PathLike, Task, check_sizes, data_file, find_data_dir, pool_split, select_rows, sizes_or_defaults
from .hub import HubSource, load_hub_splits

WINOGRANDE_TEMPLATE = (
    "Please fill in the blanks. Write A or B as the answer.\n\n"
    "Sentence: {sentence}\nA. {option1}\nB. {option2}\nAnswer:"
)
WINOGRANDE_CHOICES = [" A", " B"]  # label 0 = option1, 1 = option2
TRAIN_FILE = "train_xl_first2000.jsonl"
TEST_FILE = "dev.jsonl"
WINOGRANDE_HUB = HubSource("allenai/winogrande", "winogrande_xl")
TRAIN_ITEMS = 2000  # train_xl_first2000.jsonl: the first 2000 items of the winogrande_xl train split


def read_winogrande(path: Path) -> list[dict]:
    """Rows of one WinoGrande JSONL file (``{sentence, option1, option2, answer}``; ``answer`` is ``"1"`` / ``"2"``;
    dev items also have ``qID``, used as the id)."""
    with open(path, encoding="utf-8") as handle:
        items = [(number, json.loads(line)) for number, line in enumerate(handle) if line.strip()]
    return winogrande_rows(items, str(path), path.stem)


def winogrande_rows(items, source: str, stem: str) -> list[dict]:
    """Rows of ``(number, item)`` pairs, from a local file or a Hub split (same fields, no ``qID`` on the Hub)."""
    rows = []
    for number, item in items:
        missing = {"sentence", "option1", "option2", "answer"} - set(item)
        if missing:
            raise ValueError(f"{source}, line {number + 1}: a WinoGrande item needs {sorted(missing)}.")
        answer = str(item["answer"]).strip()
        if answer not in ("1", "2"):
            raise ValueError(f"{source}, line {number + 1}: answer must be '1' or '2', got {item['answer']!r}.")
        rows.append({
            "id": str(item.get("qID") or f"{stem}-{number}"),
            "prompt": WINOGRANDE_TEMPLATE.format(sentence=item["sentence"].strip(), option1=item["option1"],
                                                 option2=item["option2"]),
            "choices": list(WINOGRANDE_CHOICES),
            "label": int(answer) - 1,
        })
    return rows


def load_winogrande(data_dir: Optional[PathLike] = None, n_fit: Optional[int] = None,
                    n_validation: Optional[int] = None, seed: int = 0) -> Task:
    """WinoGrande: fit (1000) and validation (200) drawn disjointly from the 2000 train items, test = the official
    dev set (1267)."""
    folder = find_data_dir(data_dir)
    if folder is None:
        splits = load_hub_splits(WINOGRANDE_HUB, [f"train[:{TRAIN_ITEMS}]", "validation"])
        train = winogrande_rows(enumerate(splits[f"train[:{TRAIN_ITEMS}]"]), str(WINOGRANDE_HUB), "train")
        test = winogrande_rows(enumerate(splits["validation"]), str(WINOGRANDE_HUB), "dev")
        train_name = f"the first {TRAIN_ITEMS} items of its train split"
        test_name, origin = "its validation split, the official dev set", f" from the Hub ({WINOGRANDE_HUB})"
    else:
        train = read_winogrande(data_file(folder / "WinoGrande", TRAIN_FILE))
        test = read_winogrande(data_file(folder / "WinoGrande", TEST_FILE))
        train_name, test_name, origin = TRAIN_FILE, f"the official dev set {TEST_FILE}", ""
    n_fit, n_validation = sizes_or_defaults(n_fit, n_validation, default_fit=1000)
    check_sizes("winogrande", n_fit, n_validation, len(train), train_name)
    fit_idx, val_idx, _ = pool_split(len(train), len(train), n_fit, n_validation, seed)
    note = (f"WinoGrande{origin}: fit {len(fit_idx)} + validation {len(val_idx)} drawn disjointly from {train_name} "
            f"({len(train)} winogrande_xl train items) with seed {seed}; test = {test_name} ({len(test)}).")
    return Task("winogrande", "choice", select_rows(train, fit_idx), select_rows(train, val_idx),
                Dataset.from_list(test), choices=list(WINOGRANDE_CHOICES), split_note=note, seed=seed,
                metadata={"hub_dataset": str(WINOGRANDE_HUB)} if folder is None else {})
