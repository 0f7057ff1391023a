"""Token scope: steering only generated tokens or tokens from a position on, checked against a reference that steers
the plain model by explicit position masks (and recomputes the whole sequence at every step, without a KV cache)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import logits, spread_aus, tiny_model
from peft import PeftModel, get_peft_model

from austeer_peft import AUSteerConfig, AUSteerLayer
from austeer_peft.tuner.sites import candidate_modules

SITES = ["attention", "ffn"]
SCOPES = [{"scope": "generated"}, {"scope": "from_position", "scope_position": 3}]
PROMPT = torch.tensor([[0, 0, 0, 7, 8, 9], [11, 12, 13, 14, 15, 16]])  # left-padded: row 0 has 3 real tokens
PADS = torch.tensor([3, 0])
GENERATE = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)


def steered_model(family, aus, **scope):
    model = get_peft_model(tiny_model(family), AUSteerConfig(sites=SITES, **scope))
    model.set_aus(aus)
    return model


def reference_hooks(base, aus, keep):
    """Steer the plain `base` by hand: x[b, t, dim] *= 1 + γ wherever keep(batch, tokens)[b, t] is True."""
    positions = {c.name: c.position for c in candidate_modules(base, AUSteerConfig(sites=SITES))}
    modules = dict(base.named_modules())
    handles = []
    for name, dim, gamma in aus:
        def scale(x, dim=dim, gamma=gamma):
            x = x.clone()
            x[..., dim] = torch.where(keep(*x.shape[:2]), x[..., dim] * (1 + gamma), x[..., dim])
            return x

        if positions[name] == "input":
            handles.append(modules[name].register_forward_pre_hook(lambda m, args, s=scale: (s(args[0]), *args[1:])))
        else:
            handles.append(modules[name].register_forward_hook(lambda m, args, out, s=scale: s(out)))
    return handles


def reference_keep(scope, prompt_width, pads):
    """The explicit mask of a full (uncached) sequence: rows carry `pads` left pads, the prompt has `prompt_width`
    columns."""
    def keep(batch, tokens):
        columns = torch.arange(tokens).expand(batch, tokens)
        if scope["scope"] == "generated":
            return columns >= prompt_width - 1
        return columns - pads.repeat_interleave(batch // len(pads))[:, None] >= scope["scope_position"]
    return keep


def reference_generate(family, aus, scope, **kwargs):
    base = tiny_model(family)
    handles = reference_hooks(base, aus, reference_keep(scope, PROMPT.shape[1], PADS))
    with torch.no_grad():
        out = base.generate(input_ids=PROMPT, attention_mask=(PROMPT != 0).long(), use_cache=False, **kwargs)
    for handle in handles:
        handle.remove()
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("scope", SCOPES, ids=lambda s: s["scope"])
def test_greedy_generate_with_cache_matches_position_mask_reference(family, scope):
    aus = spread_aus(tiny_model(family), SITES, 12, gamma_range=(-0.9, 6.0))
    want = reference_generate(family, aus, scope, **GENERATE)
    model = steered_model(family, aus, **scope)
    with torch.no_grad():
        got = model.generate(input_ids=PROMPT, attention_mask=(PROMPT != 0).long(), **GENERATE)
        uncached = model.generate(input_ids=PROMPT, attention_mask=(PROMPT != 0).long(), use_cache=False, **GENERATE)
        with model.disable_adapter():
            plain = model.generate(input_ids=PROMPT, attention_mask=(PROMPT != 0).long(), **GENERATE)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-4, atol=1e-5)
    assert torch.equal(uncached.sequences, want.sequences)  # generate tells the layers where the prompt ends
    torch.testing.assert_close(torch.stack(uncached.logits), torch.stack(want.logits), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(torch.stack(got.logits), torch.stack(plain.logits))  # the steering does something


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("scope", SCOPES, ids=lambda s: s["scope"])
def test_beam_search_matches_position_mask_reference(family, scope):
    aus = spread_aus(tiny_model(family), SITES, 12, gamma_range=(-0.9, 6.0))
    beams = dict(max_new_tokens=5, num_beams=3, num_return_sequences=3, do_sample=False, pad_token_id=0,
                 return_dict_in_generate=True, output_scores=True)
    want = reference_generate(family, aus, scope, **beams)
    model = steered_model(family, aus, **scope)
    with torch.no_grad():
        got = model.generate(input_ids=PROMPT, attention_mask=(PROMPT != 0).long(), **beams)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=1e-4, atol=1e-5)


def test_generated_in_plain_forward_steers_last_token_then_every_cached_step():
    """Outside generate, a forward that starts a sequence steers each row's last real token; one that continues a KV
    cache steers all its tokens: a hand-written decoding loop gives what generate gives."""
    aus = spread_aus(tiny_model("llama"), SITES, 12, gamma_range=(-0.9, 6.0))
    model = steered_model("llama", aus, scope="generated")
    mask = (PROMPT != 0).long()
    base = tiny_model("llama")
    last_only = lambda batch, tokens: (torch.arange(tokens) == tokens - 1).expand(batch, tokens)  # noqa: E731
    handles = reference_hooks(base, aus, last_only)
    with torch.no_grad():
        want = base(PROMPT, attention_mask=mask).logits
        got = model(PROMPT, attention_mask=mask, use_cache=True)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(got.logits, want, rtol=1e-5, atol=1e-6)

    tokens, cache = [got.logits[:, -1].argmax(-1)], got.past_key_values
    with torch.no_grad():
        for _ in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            step = model(tokens[-1][:, None], attention_mask=mask, past_key_values=cache, use_cache=True)
            tokens.append(step.logits[:, -1].argmax(-1))
        generated = model.generate(input_ids=PROMPT, attention_mask=(PROMPT != 0).long(), **GENERATE)
    assert torch.equal(torch.stack(tokens, dim=1), generated.sequences[:, PROMPT.shape[1]:][:, :4])


def test_from_position_ignores_left_padding():
    """Each row of a left-padded batch is steered as when it runs alone."""
    aus = spread_aus(tiny_model("qwen2"), SITES, 12, gamma_range=(-0.9, 6.0))
    model = steered_model("qwen2", aus, scope="from_position", scope_position=2)
    mask = (PROMPT != 0).long()
    with torch.no_grad():
        batch = model(PROMPT, attention_mask=mask).logits
        alone = model(PROMPT[:1, 3:]).logits
        with model.disable_adapter():
            plain = model(PROMPT[:1, 3:]).logits
    torch.testing.assert_close(batch[0, 3:], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone[0, :2], plain[0, :2], rtol=0, atol=0)  # positions 0 and 1 untouched
    assert not torch.allclose(alone[0, 2:], plain[0, 2:])


def test_adapters_with_different_scopes_steer_together():
    aus_a = spread_aus(tiny_model("llama"), SITES, 8, seed=1, gamma_range=(-0.9, 6.0))
    aus_b = spread_aus(tiny_model("llama"), SITES, 8, seed=2, gamma_range=(-0.9, 6.0))
    model = steered_model("llama", aus_a, scope="generated")
    model.add_adapter("b", AUSteerConfig(sites=SITES, scope="from_position", scope_position=4))
    model.set_aus(aus_b, adapter_name="b")
    model.base_model.set_adapter(["default", "b"])
    base = tiny_model("llama")
    handles = reference_hooks(base, aus_a, reference_keep({"scope": "generated"}, PROMPT.shape[1], PADS))
    handles += reference_hooks(base, aus_b, reference_keep({"scope": "from_position", "scope_position": 4},
                                                            PROMPT.shape[1], PADS))
    with torch.no_grad():
        want = base.generate(input_ids=PROMPT, attention_mask=(PROMPT != 0).long(), use_cache=False, **GENERATE)
        got = model.generate(input_ids=PROMPT, attention_mask=(PROMPT != 0).long(), **GENERATE)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scope", SCOPES, ids=lambda s: s["scope"])
def test_scope_survives_save_and_load_and_refuses_merge(scope, tmp_path):
    aus = spread_aus(tiny_model("llama"), SITES, 12, gamma_range=(-0.9, 6.0))
    model = steered_model("llama", aus, **scope)
    with torch.no_grad():
        want = model.generate(input_ids=PROMPT, attention_mask=(PROMPT != 0).long(), **GENERATE)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["scope"] == scope["scope"] and saved["scope_position"] == scope.get("scope_position")

    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert loaded.peft_config["default"].scope == scope["scope"]
    with torch.no_grad():
        got = loaded.generate(input_ids=PROMPT, attention_mask=(PROMPT != 0).long(), **GENERATE)
    assert torch.equal(got.sequences, want.sequences)

    original = {k: v.clone() for k, v in loaded.get_base_model().state_dict().items()}
    for merge in (loaded.merge_adapter, loaded.merge_and_unload):
        with pytest.raises(ValueError, match=f"scope='{scope['scope']}'.*only scope='all' adapters can be merged"):
            merge()
    assert all(torch.equal(v, original[k]) for k, v in loaded.get_base_model().state_dict().items())


def test_scope_all_adds_no_work_and_hooks_go_with_the_last_scoped_adapter():
    model = steered_model("llama", spread_aus(tiny_model("llama"), SITES, 6))
    stack = model.get_base_model().model
    layers = [m for m in model.modules() if isinstance(m, AUSteerLayer)]
    assert not stack._forward_pre_hooks and "generate" not in vars(model.get_base_model())
    assert all(layer.token_positions is None for layer in layers)

    model.add_adapter("late", AUSteerConfig(sites=SITES, scope="generated"))
    model.set_aus([(("ffn", 1), 3, 2.0)], adapter_name="late")
    assert len(stack._forward_pre_hooks) == 1 and "generate" not in vars(model.get_base_model())  # never patched
    model.delete_adapter("late")
    assert not stack._forward_pre_hooks and "generate" not in vars(model.get_base_model())
    assert all(layer.token_positions is None for layer in model.modules() if isinstance(layer, AUSteerLayer))

    scoped = steered_model("llama", [(("ffn", 1), 3, 2.0)], scope="generated")
    plain = scoped.unload()
    assert not plain.model._forward_pre_hooks and "generate" not in vars(plain)


def test_layer_called_outside_the_model_names_the_problem(input_ids):
    model = steered_model("llama", [(("ffn", 0), 3, 2.0)], scope="from_position", scope_position=1)
    logits(model, input_ids)
    layer = next(m for m in model.modules() if isinstance(m, AUSteerLayer))
    with pytest.raises(RuntimeError, match="positions of this activation .* are unknown.*Call the model"):
        layer(torch.randn(3, 4, 32))


def test_config_checks_scope():
    with pytest.raises(ValueError, match="`scope` must be 'all', 'generated' or 'from_position'"):
        AUSteerConfig(scope="prompt")
    with pytest.raises(ValueError, match="needs `scope_position`"):
        AUSteerConfig(scope="from_position")
    with pytest.raises(ValueError, match="needs `scope_position`"):
        AUSteerConfig(scope="from_position", scope_position=-1)
    with pytest.raises(ValueError, match="only used with scope='from_position'"):
        AUSteerConfig(scope="generated", scope_position=2)
    assert AUSteerConfig().scope == "all"


def test_set_scope_changes_an_existing_adapter(input_ids):
    aus = spread_aus(tiny_model("llama"), SITES, 12, gamma_range=(-0.9, 6.0))
    made_scoped = steered_model("llama", aus, scope="from_position", scope_position=3)
    model = steered_model("llama", aus)  # scope="all", as a fit makes it
    everywhere = logits(model, input_ids)
    model.set_scope("from_position", 3)
    assert torch.equal(logits(model, input_ids), logits(made_scoped, input_ids))
    model.set_scope("all")
    assert torch.equal(logits(model, input_ids), everywhere)
    assert not model.get_base_model().model._forward_pre_hooks
    with pytest.raises(ValueError, match="needs `scope_position`"):
        model.set_scope("from_position")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged; call `unmerge_adapter\\(\\)` before giving it a scope"):
        model.set_scope("generated")


@pytest.mark.parametrize("cache_argument", ["cache", "past_key_values"])
def test_from_position_continues_a_kv_cache_without_attention_mask(cache_argument):
    """A forward that continues a KV cache and passes no attention mask takes its positions from the cache's length
    (transformers 5 names it `cache`, older code `past_key_values`): steering the rest of a sequence from a cached
    prefix equals steering the whole sequence."""
    aus = spread_aus(tiny_model("llama"), SITES, 12, gamma_range=(-0.9, 6.0))
    model = steered_model("llama", aus, scope="from_position", scope_position=3)
    sequence = PROMPT[1:]
    with torch.no_grad():
        whole = model(sequence).logits
        prefix = model(sequence[:, :2], use_cache=True)
        rest = model(sequence[:, 2:], **{cache_argument: prefix.past_key_values}, use_cache=True).logits
    torch.testing.assert_close(rest, whole[:, 2:], rtol=1e-5, atol=1e-5)
