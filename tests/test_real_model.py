"""The real SmolLM2-135M-Instruct (GGUF from PyPI, dequantized on load): a hand-set and a fitted adapter through
save, load and merge."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from austeer_peft import AUSteerConfig

pytestmark = pytest.mark.real


def test_smollm2_hand_set_adapter_save_load_merge(smollm2, tmp_path):
    model, tokenizer = smollm2  # shared by other tests: every step below leaves it as it was
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    batch = tokenizer(["The movie was wonderful. Sentiment:", "A dull, lifeless film. Sentiment:"],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = model(**batch).logits
    peft_model = get_peft_model(model, AUSteerConfig(sites=["attention", "ffn"], k=4, alpha=15))
    # dimension 20 of head 3 at layer 27 (head_dim 64), and three MLP outputs
    peft_model.set_aus([(("attention", 27), 3 * 64 + 20, 15.0), (("ffn", 10), 100, -0.9),
                        (("ffn", 20), 7, 4.0), (("ffn", 29), 300, 30.0)])
    with torch.no_grad():
        steered = peft_model(**batch).logits
        assert (steered - reference).abs().max() > 1e-2
        peft_model.save_pretrained(tmp_path)
        assert (tmp_path / "adapter_model.safetensors").stat().st_size <= 4096

        peft_model.merge_adapter()
        torch.testing.assert_close(peft_model(**batch).logits, steered, rtol=0, atol=1e-4)
        peft_model.unmerge_adapter()
        plain = peft_model.unload()
        assert all(torch.equal(v, weights[k]) for k, v in plain.state_dict().items())

        loaded = PeftModel.from_pretrained(plain, tmp_path)
        assert torch.equal(loaded(**batch).logits, steered)
        with loaded.disable_adapter():
            assert torch.equal(loaded(**batch).logits, reference)
        loaded.unload()


def test_smollm2_fit_on_sst2_save_load_merge(smollm2, tmp_path):
    """The GGUF (Q4_1) model, dequantized by transformers: fit on 16 SST-2 pairs, then save, load and merge."""
    from austeer_peft import fit_austeer
    from austeer_peft.evaluate import load_task

    model, tokenizer = smollm2  # shared by other tests: every step below leaves it as it was
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = load_task("sst2", n_fit=16).pairs("fit")
    batch = tokenizer(["Review: a gorgeous, witty film\nSentiment:"], return_tensors="pt")
    with torch.no_grad():
        plain = model(**batch).logits
    result = fit_austeer(model, tokenizer, pairs, sites=["attention", "ffn", "ffn_inner"], k=30, alpha=15,
                         batch_size=8, progress=False)
    peft_model = result.peft_model
    try:
        assert result.scores.num_pairs == 16 and len(peft_model.get_aus()) == 30
        with torch.no_grad():
            steered = peft_model(**batch).logits
            assert (steered - plain).abs().max() > 1e-2
            peft_model.save_pretrained(tmp_path)
            peft_model.merge_adapter()
            merged = peft_model(**batch).logits
            peft_model.unmerge_adapter()
        error, effect = (merged - steered).abs().max().item(), (steered - plain).abs().max().item()
        print(f"\nSmolLM2 (GGUF Q4_1) fit on 16 SST-2 pairs: merged vs steered max |logit| error {error:.2e}, "
              f"steering effect {effect:.2e}")
        torch.testing.assert_close(merged, steered, rtol=0, atol=1e-4)
    finally:
        assert peft_model.unload() is model
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())

    loaded = PeftModel.from_pretrained(model, tmp_path)
    try:
        assert sorted(loaded.get_aus()) == sorted(result.peft_model.get_aus())
        with torch.no_grad():
            assert torch.equal(loaded(**batch).logits, steered)
    finally:
        loaded.unload()


def test_smollm2_first_tokens_tell_every_builtin_choice_apart(smollm2):
    """The restricted first-token scoring needs each choice task's answers to start with distinct tokens after its
    real prompts; WinoGrande's " A" / " B" included."""
    from austeer_peft.evaluate import choice_token_ids, load_task
    from austeer_peft.evaluate.tasks import TASK_NAMES

    _, tokenizer = smollm2
    for name in TASK_NAMES:
        task = load_task(name, n_fit=4, n_validation=4)
        if task.kind != "choice":
            continue
        for prompt in task.test.select(range(8))["prompt"]:
            ids = choice_token_ids(tokenizer, task.choices, prompt)  # raises if two choices share a first token
            assert len(set(ids)) == len(task.choices), (name, prompt)
