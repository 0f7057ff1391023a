"""The fit (activation momentum): counts against a brute-force reference, batching/padding/order invariance,
determinism, constant memory, early stop, bad inputs, and one real-model fit (marked `real`)."""

from __future__ import annotations

import csv
import filecmp
import math
import random
import warnings

import pytest
import torch
from conftest import ALL_SITES, DATA_DIR, brute_force_counts, char_tokenizer, random_pairs, tiny_model
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from austeer_peft import AU, AUSteerConfig, AUSteerLayer, FitResult, MomentumScores, compute_momentum, fit_austeer
from austeer_peft.fitting.counter import MomentumCounter
from austeer_peft.fitting.inputs import make_batches, tokenize_pairs
from austeer_peft.tuner.sites import SiteModule, base_named_modules, candidate_modules, unwrap

TWO_FAMILIES = ["llama", "gpt2"]


def assert_same_counts(scores: MomentumScores, other: MomentumScores) -> None:
    assert [m.name for m in scores.modules] == [m.name for m in other.modules]
    assert scores.num_pairs == other.num_pairs
    for m in scores.modules:
        assert torch.equal(scores.n_pos[m.name], other.n_pos[m.name]), m.name
        assert torch.equal(scores.n_neg[m.name], other.n_neg[m.name]), m.name


def no_hooks_left(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("family", TWO_FAMILIES)
def test_counts_equal_brute_force_reference(family):
    model, tokenizer, pairs = tiny_model(family), char_tokenizer(), random_pairs(10)
    scores = compute_momentum(model, tokenizer, pairs, sites=ALL_SITES, batch_size=3, progress=False)
    n_pos, n_neg = brute_force_counts(model, tokenizer, pairs, ALL_SITES)
    assert scores.num_pairs == 10
    assert [m.site for m in scores.modules].count("residual") == 2
    for m in scores.modules:
        assert torch.equal(scores.n_pos[m.name], n_pos[m.name]), m.name
        assert torch.equal(scores.n_neg[m.name], n_neg[m.name]), m.name
        assert bool((scores.n_pos[m.name] + scores.n_neg[m.name] <= 10).all())
    assert no_hooks_left(model)


@pytest.mark.parametrize("family", TWO_FAMILIES)
def test_batching_padding_side_and_order_do_not_change_counts(family):
    model, pairs = tiny_model(family), random_pairs(11, seed=3)
    reference = compute_momentum(model, char_tokenizer("right"), pairs, sites=ALL_SITES, batch_size=1, progress=False)
    shuffled = pairs[:]
    random.Random(0).shuffle(shuffled)
    for padding_side, batch_size, data in [("right", 4, pairs), ("left", 4, pairs), ("left", 11, pairs),
                                           ("right", 3, shuffled), ("left", 5, shuffled)]:
        scores = compute_momentum(model, char_tokenizer(padding_side), data, sites=ALL_SITES, batch_size=batch_size,
                                  progress=False)
        assert_same_counts(scores, reference)


def test_left_padding_batches_really_pad_and_use_positions_from_the_mask():
    tokenizer = char_tokenizer("left")
    token_pairs = tokenize_pairs(tokenizer, [("abcd", "ab"), ("a", "abc")], max_length=None)
    (batch,) = make_batches(token_pairs, 2, pad_id=0, padding_side="left")
    assert batch.pair_indices == [0, 1]  # longest first, stable
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 2]]
    assert batch.last_token.tolist() == [3, 3, 3, 3]
    (right,) = make_batches(token_pairs, 2, pad_id=0, padding_side="right")
    assert right.last_token.tolist() == [3, 0, 1, 2]


def test_a_bos_already_in_the_text_is_not_doubled():
    from tokenizers.processors import TemplateProcessing

    tokenizer = char_tokenizer()
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    assert tokenize_pairs(tokenizer, [("<s>ab", "ab")], max_length=None) == [([1, a, b], [1, a, b])]


def test_pair_formats_give_the_same_counts():
    from datasets import Dataset

    model, tokenizer = tiny_model("llama"), char_tokenizer()
    triples = [("Q: " + a + "? A:", " yes " + a, " no " + b) for a, b in [("sun", "red"), ("cat", "dog"),
                                                                          ("tree", "sea"), ("hot", "cold")]]
    as_tuples = [(p + c, p + r) for p, c, r in triples]
    dataset = Dataset.from_dict({"prompt": [t[0] for t in triples], "chosen": [t[1] for t in triples],
                                 "rejected": [t[2] for t in triples]})
    reference = compute_momentum(model, tokenizer, as_tuples, sites=["ffn"], progress=False)
    for data in (triples, dataset, [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in triples]):
        assert_same_counts(compute_momentum(model, tokenizer, data, sites=["ffn"], progress=False), reference)


def test_chat_template_wraps_the_prompt_as_a_user_turn():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    triples = [("sky?", " blue", " red"), ("sea?", " wet", " dry")]
    rendered = [("<user>" + p + "\n<assistant>" + c, "<user>" + p + "\n<assistant>" + r) for p, c, r in triples]
    with_template = compute_momentum(model, tokenizer, triples, sites=["attention"], chat_template=True, progress=False)
    assert_same_counts(with_template, compute_momentum(model, tokenizer, rendered, sites=["attention"], progress=False))


def test_left_truncation_keeps_the_last_tokens_and_warns():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    pairs = random_pairs(6, seed=5)
    with pytest.warns(UserWarning, match="truncated from the left"):
        scores = compute_momentum(model, tokenizer, pairs, sites=["ffn"], max_length=9, progress=False)
    cut = [(p[-9:], n[-9:]) for p, n in pairs]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same_counts(scores, compute_momentum(model, tokenizer, cut, sites=["ffn"], progress=False))


def test_forward_stops_after_the_last_needed_module():
    model, tokenizer = tiny_model("llama", layers=3), char_tokenizer()
    calls = {"lm_head": 0, "norm": 0, "last_mlp": 0, "last_o_proj": 0}
    hooks = [model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1)),
             model.model.norm.register_forward_hook(lambda *a: calls.__setitem__("norm", calls["norm"] + 1)),
             model.model.layers[2].mlp.register_forward_hook(
                 lambda *a: calls.__setitem__("last_mlp", calls["last_mlp"] + 1)),
             model.model.layers[2].self_attn.o_proj.register_forward_hook(
                 lambda *a: calls.__setitem__("last_o_proj", calls["last_o_proj"] + 1))]
    compute_momentum(model, tokenizer, random_pairs(4), sites=["attention"], batch_size=2, progress=False)
    # The last o_proj's *input* is read in a pre-hook, so not even that projection runs.
    assert calls == {"lm_head": 0, "norm": 0, "last_mlp": 0, "last_o_proj": 0}
    compute_momentum(model, tokenizer, random_pairs(4), sites=["residual"], batch_size=2, progress=False)
    # 2 batches, each its shared prompts then both continuations: 4 forwards, none past the last block.
    assert calls["lm_head"] == 0 and calls["norm"] == 0 and calls["last_mlp"] == 4
    compute_momentum(model, tokenizer, random_pairs(4), sites=["residual"], batch_size=2, progress=False,
                     share_prompts=False)
    assert calls["lm_head"] == 0 and calls["norm"] == 0 and calls["last_mlp"] == 6
    for hook in hooks:
        hook.remove()
    assert no_hooks_left(model)


def test_fit_on_a_peft_model_reads_unsteered_activations():
    tokenizer, pairs = char_tokenizer(), random_pairs(6)
    plain = compute_momentum(tiny_model("llama"), tokenizer, pairs, sites=["attention", "ffn"], progress=False)
    steered = get_peft_model(tiny_model("llama"), AUSteerConfig(sites=["attention", "ffn"]))
    steered.set_aus([(("attention", 0), d, 5.0) for d in range(32)] + [(("ffn", 0), d, -3.0) for d in range(32)])
    assert_same_counts(compute_momentum(steered, tokenizer, pairs, sites=["attention", "ffn"], progress=False), plain)

    result = fit_austeer(steered, tokenizer, pairs, sites=["attention", "ffn"], k=7, alpha=3.0,
                         adapter_name="fitted", progress=False)
    assert result.peft_model is steered
    assert steered.active_adapters == ["fitted"]
    assert sorted(steered.peft_config) == ["default", "fitted"]
    assert len(steered.get_aus("fitted")) == 7 and len(steered.get_aus("default")) == 64
    assert_same_counts(result.scores, plain)


def dispatched_llama(how: str, tmp_path):
    """The tiny 3-layer Llama dispatched by accelerate: `cpu_offload` (every weight on the meta device between
    forwards), or `from_pretrained` with a device_map that puts layers on "cpu" entries and layer 1 on "disk"."""
    from accelerate import cpu_offload

    model = tiny_model("llama", layers=3)
    if how == "cpu_offload":
        return cpu_offload(model, execution_device="cpu")
    model.save_pretrained(tmp_path / "tiny")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    return AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", device_map=device_map,
                                                offload_folder=tmp_path / "offload")


def dispatched_weights(model) -> dict[str, torch.Tensor]:
    """Every weight of a dispatched model by name: an offloaded one is read from its hook's weights map."""
    weights = {}
    for name, module in base_named_modules(model).items():
        module = unwrap(module)
        hook = vars(module).get("_hf_hook")
        for key, tensor in module.named_parameters(recurse=False):
            if tensor.device.type == "meta":
                tensor = hook.weights_map[key]
            weights[f"{name}.{key}".lstrip(".")] = tensor.detach().clone()
    return weights


@pytest.mark.parametrize("how", ["cpu_offload", "device_map"])
def test_offloaded_model_gives_the_same_counts(how, tmp_path):
    tokenizer, pairs = char_tokenizer("left"), random_pairs(5)
    reference = compute_momentum(tiny_model("llama", layers=3), tokenizer, pairs, sites=ALL_SITES, progress=False)
    offloaded = dispatched_llama(how, tmp_path)
    assert any(p.device.type == "meta" for p in offloaded.parameters())
    assert_same_counts(compute_momentum(offloaded, tokenizer, pairs, sites=ALL_SITES, batch_size=2, progress=False),
                       reference)


@pytest.mark.parametrize("how", ["cpu_offload", "device_map"])
def test_dispatched_model_fits_steers_and_merges_in_place(how, tmp_path):
    from conftest import logits, spread_aus

    from austeer_peft.tuner.model import execution_device

    sites, tokenizer, pairs = ["attention", "ffn", "ffn_inner"], char_tokenizer(), random_pairs(8)
    input_ids = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    reference = fit_austeer(tiny_model("llama", layers=3), tokenizer, pairs, sites=sites, k=20, progress=False)
    model = fit_austeer(dispatched_llama(how, tmp_path), tokenizer, pairs, sites=sites, k=20, progress=False)
    reference, model = reference.peft_model, model.peft_model
    assert sorted(model.get_aus()) == sorted(reference.get_aus())
    original = dispatched_weights(model.get_base_model())
    plain = logits(tiny_model("llama", layers=3), input_ids)

    # Hand-set AUs on every module, the offloaded ones included (`ffn` and `ffn_inner` fold into one down_proj).
    aus = spread_aus(model, sites, 120, seed=3)
    assert {name for name, _, _ in aus} == {c.name for c in candidate_modules(model, AUSteerConfig(sites=sites))}
    for peft_model in (model, reference):
        peft_model.set_aus(aus)
    for layer in model.modules():
        if isinstance(layer, AUSteerLayer):  # adapters live where their module computes (the hook's device)
            assert layer.austeer_gamma["default"].device == execution_device(layer.base_layer)
    steered = logits(model, input_ids)
    assert torch.equal(steered, logits(reference, input_ids))

    model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), steered, rtol=0, atol=1e-5)
    reference.merge_adapter()
    merged = dispatched_weights(model.get_base_model())
    for name, weight in reference.get_base_model().state_dict().items():
        assert torch.equal(merged[name.replace(".base_layer", "")], weight), name
    with model.disable_adapter():  # unmerges, also the offloaded weights
        assert torch.equal(logits(model, input_ids), plain)
    model.merge_adapter()
    model.unmerge_adapter()
    restored = dispatched_weights(model.get_base_model())
    assert all(torch.equal(restored[name], weight) for name, weight in original.items())
    assert torch.equal(logits(model, input_ids), steered)

    unloaded = model.merge_and_unload()
    assert not any(isinstance(m, AUSteerLayer) for m in unloaded.modules())
    torch.testing.assert_close(logits(unloaded, input_ids), steered, rtol=0, atol=1e-5)


def test_adapters_go_to_the_execution_device_not_where_offloaded_weights_wait():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny_model("llama")
    # Offloaded to run on another device (on a GPU machine "cuda:0"; here "meta", the only other device a CPU has).
    o_proj = model.model.layers[1].self_attn.o_proj
    add_hook_to_module(o_proj, AlignDevicesHook(execution_device=torch.device("meta"), offload=True))
    assert o_proj.weight.device.type == "meta"
    model = get_peft_model(model, AUSteerConfig(sites=["attention"]))
    model.set_aus([(("attention", 0), 1, 2.0), (("attention", 1), 3, 2.0)])
    layers = [m for m in model.modules() if isinstance(m, AUSteerLayer)]
    assert [layer.austeer_gamma["default"].device.type for layer in layers] == ["cpu", "meta"]
    assert [layer.austeer_index["default"].device.type for layer in layers] == ["cpu", "meta"]


def test_weights_offloaded_without_a_hook_to_load_them_are_not_merged():
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = get_peft_model(tiny_model("llama"), AUSteerConfig(sites=["ffn"]))
    model.set_aus([(("ffn", 1), 3, 2.0)])
    mlp = model.get_base_model().model.layers[1].mlp
    # One hook on the MLP block loads all its children's weights (place_submodules): the down projection has none.
    add_hook_to_module(mlp.base_layer, AlignDevicesHook(execution_device="cpu", offload=True, place_submodules=True))
    with pytest.raises(ValueError, match="meta device and no accelerate offload hook"):
        model.merge_adapter()
    assert not mlp.merged_adapters


def test_target_modules_count_like_the_matching_site():
    model, tokenizer, pairs = tiny_model("llama"), char_tokenizer(), random_pairs(5)
    by_site = compute_momentum(model, tokenizer, pairs, sites=["attention"], progress=False)
    result = fit_austeer(model, tokenizer, pairs, target_modules=["o_proj"], position="input", k=6, alpha=2.0,
                         progress=False)
    assert_same_counts(result.scores, by_site)
    assert result.scores.sites is None and result.scores.target_modules == ["o_proj"]
    assert result.peft_model.peft_config["default"].target_modules == ["o_proj"]
    assert sorted(result.peft_model.get_aus()) == sorted(by_site.select(6, 2.0))
    assert list(result.scores.layer_distribution(6)) == [("model.layers.0.self_attn.o_proj", 0),
                                                         ("model.layers.1.self_attn.o_proj", 1)]


# ---------------------------------------------------------------------------------------------------- selection


def hand_made_scores() -> MomentumScores:
    modules = [SiteModule("a", "attention", 0, "input", 4), SiteModule("b", "ffn", 0, "output", 3)]
    n_pos = {"a": torch.tensor([8, 2, 5, 0]), "b": torch.tensor([2, 8, 5])}
    n_neg = {"a": torch.tensor([1, 8, 5, 0]), "b": torch.tensor([8, 1, 4])}  # pair counts may leave ties out of both
    return MomentumScores(modules, n_pos, n_neg, num_pairs=10, model_type="llama", sites=["attention", "ffn"])


def test_select_ranks_globally_with_documented_tie_break_and_gamma():
    scores = hand_made_scores()
    aus = scores.select(5, alpha=10)
    # s = 0.8 for a[0], a[1], b[0], b[1]: model order of modules, then lower dimension.
    assert [(au.module, au.dim) for au in aus] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("a", 2)]
    assert [au.gamma for au in aus] == pytest.approx([8.0, -8.0, -8.0, 8.0, -5.0])  # r_pos == r_neg -> -α·r_neg
    assert all(isinstance(au, AU) for au in aus)
    assert scores.layer_distribution(5) == {("attention", 0): 3, ("ffn", 0): 2}
    assert scores.score("b").tolist() == pytest.approx([0.8, 0.8, 0.5])
    with pytest.warns(UserWarning, match="never separated a pair"):
        scores.select(7, alpha=1)


@pytest.mark.parametrize("k", [8, 100])
def test_k_larger_than_candidate_aus_names_both_numbers(k):
    with pytest.raises(ValueError, match=rf"k={k} .*\(7 over 2 modules"):
        hand_made_scores().select(k, alpha=1)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), "15", True])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha"):
        hand_made_scores().select(3, alpha=alpha)


def test_scores_save_load_and_any_adapter_without_another_pass(tmp_path):
    model, tokenizer = tiny_model("gpt2"), char_tokenizer()
    scores = compute_momentum(model, tokenizer, random_pairs(8), sites=["attention", "ffn_inner"], progress=False)
    scores.save(tmp_path / "scores.safetensors")
    loaded = MomentumScores.load(tmp_path / "scores.safetensors")
    assert_same_counts(loaded, scores)
    assert (loaded.sites, loaded.model_type, loaded.modules) == (["attention", "ffn_inner"], "gpt2", scores.modules)
    distribution = loaded.layer_distribution(20)
    assert list(distribution) == [("attention", 0), ("attention", 1), ("ffn_inner", 0), ("ffn_inner", 1)]
    assert sum(distribution.values()) == 20

    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    peft_model = loaded.to_adapter(5, 2.0, model)
    assert forwards == []
    assert isinstance(peft_model, PeftModel)
    assert sorted(peft_model.get_aus()) == sorted(scores.select(5, 2.0))
    assert peft_model.peft_config["default"].k == 5 and peft_model.peft_config["default"].alpha == 2.0
    with pytest.raises(ValueError, match="gpt2"):
        loaded.to_adapter(5, 2.0, tiny_model("llama"))


def test_scores_files_are_reproducible_and_version_1_files_still_load(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    scores = hand_made_scores()
    scores.save(tmp_path / "scores.safetensors")
    with safe_open(str(tmp_path / "scores.safetensors"), framework="pt") as handle:
        assert list(handle.metadata()) == ["austeer-momentum"]  # one entry: safetensors orders several arbitrarily
    tensors = {f"{kind}/{m.name}": getattr(scores, kind)[m.name] for m in scores.modules for kind in ("n_pos", "n_neg")}
    version_1 = {"format": "austeer-momentum", "version": "1", "num_pairs": "10", "model_type": '"llama"',
                 "sites": '["attention", "ffn"]', "target_modules": "null", "position": "output",
                 "modules": json.dumps([[m.name, m.site, m.layer, m.position, m.width] for m in scores.modules])}
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=version_1)
    loaded = MomentumScores.load(tmp_path / "v1.safetensors")
    assert_same_counts(loaded, scores)
    assert (loaded.modules, loaded.sites, loaded.model_type) == (scores.modules, scores.sites, "llama")
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an AUSteer momentum-scores file"):
        MomentumScores.load(tmp_path / "other.safetensors")


# ---------------------------------------------------------------------------------------------------- files


def test_fitting_twice_gives_byte_identical_adapter_files(tmp_path):
    tokenizer, pairs = char_tokenizer(), random_pairs(9)
    folders = []
    for run in range(2):
        result = fit_austeer(tiny_model("llama"), tokenizer, pairs, sites=["attention", "ffn"], k=12, alpha=4.0,
                             batch_size=4, progress=False)
        assert isinstance(result, FitResult)
        result.peft_model.save_pretrained(tmp_path / str(run))
        folders.append(tmp_path / str(run))
    names = sorted(p.name for p in folders[0].iterdir())
    assert "adapter_model.safetensors" in names and "adapter_config.json" in names
    match, mismatch, errors = filecmp.cmpfiles(folders[0], folders[1], names, shallow=False)
    assert mismatch == [] and errors == [] and sorted(match) == names

    reloaded = PeftModel.from_pretrained(tiny_model("llama"), folders[0])
    assert sorted(reloaded.get_aus()) == sorted(result.peft_model.get_aus())
    assert len(reloaded.get_aus()) == 12


# ---------------------------------------------------------------------------------------------------- memory


def tensors_held(obj, seen=None) -> list[torch.Tensor]:
    """Every tensor reachable from an object's attributes (through lists, tuples and dicts)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in tensors_held(value, seen)]
    if isinstance(obj, (list, tuple)):
        return [t for value in obj for t in tensors_held(value, seen)]
    if hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module):
        return tensors_held(vars(obj), seen)
    return []


def test_counting_state_does_not_grow_with_the_number_of_pairs():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    config = AUSteerConfig(sites=ALL_SITES)
    candidates = candidate_modules(model, config)
    num_aus = sum(c.width for c in candidates)
    held = []
    for num_pairs in (4, 24):
        token_pairs = tokenize_pairs(tokenizer, random_pairs(num_pairs), max_length=None)
        with MomentumCounter(model, candidates) as counter, torch.inference_mode():
            for batch in make_batches(token_pairs, 4, pad_id=0):
                counter.count_batch(lambda: model(input_ids=batch.input_ids, attention_mask=batch.attention_mask),
                                    batch.last_token, batch.input_ids.shape[1])
                # Between batches only the counts exist: three int64 counts (>, <, non-finite) per AU.
                sizes = sorted(t.numel() for t in tensors_held(counter))
                assert sum(sizes) == 3 * num_aus
                assert all(t.dtype == torch.int64 for t in tensors_held(counter))
        scores = counter.to_scores(model, config)
        assert scores.num_pairs == num_pairs
        held.append(sorted((t.numel(), t.dtype) for t in tensors_held(scores)))
    assert held[0] == held[1]
    assert no_hooks_left(model)


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "pairs, error, match",
    [
        ([], ValueError, "empty"),
        ("positive text", TypeError, "list of pairs"),
        ([("good answer", "")], ValueError, "negative .*empty"),
        ([("   ", "bad answer")], ValueError, "positive .*empty"),
        ([("prompt", "", "no")], ValueError, "empty"),
        ([("good", 3)], TypeError, "must be a string"),
        ([("good", None)], TypeError, "must be a string"),
        ([("a", "b", "c", "d")], TypeError, "each pair must be"),
        (["just a string"], TypeError, "each pair must be"),
        ([{"text": "x"}], ValueError, "chosen"),
        ([("same text", "same text"), ("other", "other")], ValueError, "identical"),
    ],
)
def test_bad_pairs_are_refused_before_anything_changes(pairs, error, match):
    model = tiny_model("llama")
    with pytest.raises(error, match=match):
        fit_austeer(model, char_tokenizer(), pairs, sites=["attention"], k=3, progress=False)
    assert not any(isinstance(m, AUSteerLayer) for m in model.modules())
    assert no_hooks_left(model)


@pytest.mark.parametrize("k, alpha, match", [(65, 15.0, r"k=65 .*\(64 over 2 modules"), (0, 15.0, "`k`"),
                                             (3, 0.0, "alpha"), (3, float("nan"), "alpha"),
                                             (3, -2.0, "alpha")])
def test_bad_k_or_alpha_is_refused_before_the_pass(k, alpha, match):
    model = tiny_model("llama")
    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    with pytest.raises(ValueError, match=match):
        fit_austeer(model, char_tokenizer(), random_pairs(3), sites=["attention"], k=k, alpha=alpha, progress=False)
    assert forwards == []


def test_some_identical_pairs_warn_and_chat_template_needs_a_prompt():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    with pytest.warns(UserWarning, match="1 of 4 pairs have identical"):
        compute_momentum(model, tokenizer, random_pairs(3) + [("same", "same")], sites=["ffn"], progress=False)
    with pytest.raises(ValueError, match="chat_template"):
        compute_momentum(model, tokenizer, random_pairs(3), sites=["ffn"], chat_template=True, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        compute_momentum(model, tokenizer, random_pairs(3), sites=["ffn"], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="Unknown AUSteer site"):
        compute_momentum(model, tokenizer, random_pairs(3), sites=["mlp"], progress=False)


def test_nan_activations_are_reported():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3] = float("nan")  # output dimension 3 of layer 1's MLP
    with pytest.warns(UserWarning, match=r"NaN/inf activations .*model\.layers\.1\.mlp"):
        scores = compute_momentum(model, tokenizer, random_pairs(4), sites=["ffn"], progress=False)
    assert scores.n_pos["model.layers.1.mlp"][3] == 0 and scores.n_neg["model.layers.1.mlp"][3] == 0


def test_pairs_whose_activations_never_differ_are_refused():
    # Texts differ only before a window that truncation cuts away: as tokens the two sides become identical.
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    pairs = [("yes: same ending", "no: same ending")]
    with pytest.warns(UserWarning, match="truncated"), pytest.raises(ValueError, match="identical"):
        fit_austeer(model, tokenizer, pairs, sites=["attention"], k=3, max_length=6, progress=False)


# ---------------------------------------------------------------------------------------------------- real model


def sst2_pairs(n: int) -> list[tuple[str, str, str]]:
    with open(DATA_DIR / "SST-2" / "train.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    labels = {"1": " positive", "0": " negative"}
    return [(f"Review: {row['text'].strip()}\nSentiment:", labels[row["label"]],
             labels["0" if row["label"] == "1" else "1"]) for row in rows]


@pytest.mark.real
def test_real_model_fit_saves_loads_and_steers(smollm2, tmp_path):
    model, tokenizer = smollm2
    pairs = sst2_pairs(64)
    inputs = tokenizer(["Review: a gorgeous, witty film\nSentiment:"], return_tensors="pt")
    with torch.no_grad():
        plain_logits = model(**inputs).logits
    result = fit_austeer(model, tokenizer, pairs, sites=["attention"], k=40, alpha=15, batch_size=16, progress=False)
    try:
        scores = result.scores
        assert scores.num_pairs == 64 and scores.model_type == "llama"
        assert len(scores.modules) == model.config.num_hidden_layers
        assert sum(scores.layer_distribution(40).values()) == 40
        assert max(s.max().item() for s in map(scores.score, scores.n_pos)) > 0.5
        aus = result.peft_model.get_aus()
        assert len(aus) == 40
        result.peft_model.save_pretrained(tmp_path / "sst2-austeer")
    finally:
        base = result.peft_model.unload()  # the model is shared by the session: put it back
    assert base is model and not any(isinstance(m, AUSteerLayer) for m in model.modules())

    loaded = PeftModel.from_pretrained(model, tmp_path / "sst2-austeer")
    try:
        assert sorted(loaded.get_aus()) == sorted(aus)
        with torch.no_grad():
            steered_logits = loaded(**inputs).logits
            with loaded.disable_adapter():
                disabled_logits = loaded(**inputs).logits
        assert torch.equal(disabled_logits, plain_logits)
        assert not torch.allclose(steered_logits, plain_logits, atol=1e-3)
        assert math.isfinite(steered_logits.abs().max().item())
    finally:
        loaded.unload()
