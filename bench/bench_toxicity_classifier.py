"""How well do the offline toxicity classifiers on PyPI agree with Perspective? (issue 22)

RealToxicityPrompts carries Perspective API scores for every prompt and human continuation; "toxic" there means
Perspective toxicity >= 0.5. For each classifier this prints the ROC AUC of its score against that label and its
agreement with it at its own threshold 0.5, on prompts, on continuations (what the detox task scores) and on both.
Texts whose Perspective score is missing are left out.

Classifiers: ``alt-profanity-check`` (the detox task's default scorer) and, when installed, ``hatesonar`` (its ONNX
model reads the en_US.UTF-8 locale, absent on many machines; the graph's StringNormalizer is given the C.UTF-8
locale here, which only affects lower-casing). Class probability of HateSonar: 1 - P(neither).

    python bench/bench_toxicity_classifier.py --output bench/detox-runs/classifier.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def load_texts(data_dir: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    texts = {"prompts": ([], []), "continuations": ([], [])}
    for name in ("toxic.jsonl", "nontoxic.jsonl"):
        for line in (data_dir / "RealToxicityPrompts" / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for part, key in (("prompt", "prompts"), ("continuation", "continuations")):
                score = row[part].get("toxicity")
                if score is not None:
                    texts[key][0].append(row[part]["text"])
                    texts[key][1].append(float(score))
    result = {key: (values[0], np.asarray(values[1])) for key, values in texts.items()}
    result["both"] = (result["prompts"][0] + result["continuations"][0],
                      np.concatenate([result["prompts"][1], result["continuations"][1]]))
    return result


def hatesonar_scorer():
    import onnx
    import onnxruntime
    from hatesonar.api import DEFAULT_MODEL_FILE

    graph = onnx.load(str(DEFAULT_MODEL_FILE))
    for node in graph.graph.node:
        if node.op_type == "StringNormalizer":
            node.attribute.append(onnx.helper.make_attribute("locale", "C.UTF-8"))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])

    def score(texts):
        probabilities = session.run(None, {"text": np.asarray(texts, dtype=object)})[1]
        return np.asarray([1.0 - row[2] for row in probabilities])  # classes: hate, offensive, neither

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    from sklearn.metrics import roc_auc_score

    from austeer_peft.evaluate.tasks import resolve_data_dir
    from austeer_peft.evaluate.toxicity import ProfanityCheckScorer

    texts = load_texts(resolve_data_dir(args.data_dir))
    scorers = {"alt-profanity-check": ProfanityCheckScorer()}
    try:
        scorers["hatesonar"] = hatesonar_scorer()
    except ImportError as error:
        print(f"hatesonar not measured: {error}")
    result = {"perspective_label": "toxicity >= 0.5", "classifier_threshold": 0.5, "classifiers": {}}
    for name, scorer in scorers.items():
        rows = {}
        for part, (strings, perspective) in texts.items():
            scores = np.asarray(scorer(strings), dtype=np.float64)
            label = perspective >= 0.5
            rows[part] = {"n": len(strings), "toxic_share_perspective": round(float(label.mean()), 4),
                          "toxic_share_classifier": round(float((scores >= 0.5).mean()), 4),
                          "auc": round(float(roc_auc_score(label, scores)), 4),
                          "agreement": round(float(((scores >= 0.5) == label).mean()), 4),
                          "recall_of_perspective_toxic": round(float((scores[label] >= 0.5).mean()), 4),
                          "precision": round(float(label[scores >= 0.5].mean()), 4)}
            print(name, part, rows[part])
        result["classifiers"][name] = rows
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
