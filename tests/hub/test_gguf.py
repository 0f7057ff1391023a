"""Merged GGUF (austeer_peft.hub.gguf, `austeer merge --gguf`) on tiny random Llama models written as GGUF files."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import get_peft_model

from austeer_peft import AUSteerConfig, merge_to_gguf
from austeer_peft.cli import main
from austeer_peft.hub.gguf import load_gguf_model, write_merged_gguf
from tests.conftest import logits, spread_aus, tiny_config

from transformers import AutoModelForCausalLM

Q = gguf.GGMLQuantizationType
ALL_F32 = {}
# Per GGUF tensor name (suffix ".weight"): a type the gguf package encodes, one it only decodes (Q4_K), and F16.
MIXED = {"blk.0.attn_output": Q.Q4_1, "blk.1.attn_output": Q.Q8_0, "blk.0.ffn_down": Q.Q4_0,
         "blk.1.ffn_down": Q.Q4_K, "blk.0.ffn_up": Q.Q5_1, "blk.1.ffn_up": Q.F16}


BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8}


def tiny_llama(seed: int = 0):
    """A Llama with GGUF-friendly widths: rows of 64 (o_proj) and 256 (down_proj) entries, whole blocks."""
    torch.manual_seed(seed)
    config = tiny_config("llama", layers=2, hidden=64)
    config.intermediate_size = 256
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of Llama's q/k rows (transformers' GGUF loader undoes it)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def random_q4_k(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random Q4_K blocks (144 bytes per 256 values) with small block scales: gguf decodes Q4_K but cannot encode it."""
    blocks = np.random.default_rng(seed).integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
    blocks[..., 0:2] = np.full((rows, cols // 256), 0.002, np.float16).view(np.uint8).reshape(rows, -1, 2)
    blocks[..., 2:4] = np.full((rows, cols // 256), 0.001, np.float16).view(np.uint8).reshape(rows, -1, 2)
    return blocks.reshape(rows, -1)


def write_tiny_gguf(model, path: Path, types: dict) -> Path:
    """``model`` as a llama GGUF file, as llama.cpp's converter names and lays out the tensors, with a small
    tokenizer and chat template in the metadata; tensors named in ``types`` are encoded in that type, others F32."""
    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(config.vocab_size)])
    writer.add_token_scores([float(-i) for i in range(config.vocab_size)])
    writer.add_token_types([1] * config.vocab_size)
    writer.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        module, suffix = key.rsplit(".", 1)
        name = name_map.get_name(module)
        data = tensor.numpy()
        if name.endswith("attn_q"):
            data = permute_qk(data, config.num_attention_heads)
        elif name.endswith("attn_k"):
            data = permute_qk(data, config.num_key_value_heads)
        qtype = types.get(name, Q.F32)
        if qtype == Q.Q4_K:
            writer.add_tensor(f"{name}.{suffix}", random_q4_k(*data.shape), raw_dtype=qtype)
        else:
            writer.add_tensor(f"{name}.{suffix}", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tensors(path: Path) -> dict:
    return {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}


def raw_bytes(tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.data).view(np.uint8)


def steered_tiny(path: Path, sites, n_aus: int, seed: int = 0):
    base = load_gguf_model(path)
    model = get_peft_model(base, AUSteerConfig(sites=sites))
    model.set_aus(spread_aus(model, sites, n_aus, seed=seed, gamma_range=(-0.6, 2.0)))
    return model


@pytest.fixture
def tiny_ids():
    return torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(1))


def test_writer_fixture_round_trips_through_transformers(tmp_path, tiny_ids):
    """The tiny GGUF reloads as the model it was written from (Q/K permutation undone), so the tests below stand on
    a file laid out as llama.cpp's converter lays it out."""
    model = tiny_llama()
    reloaded = load_gguf_model(write_tiny_gguf(model, tmp_path / "tiny.gguf", ALL_F32))
    torch.testing.assert_close(logits(reloaded, tiny_ids), logits(model, tiny_ids), rtol=0, atol=1e-5)


def test_float32_merge_equals_the_steered_model(tmp_path, tiny_ids):
    source = write_tiny_gguf(tiny_llama(), tmp_path / "tiny.gguf", ALL_F32)
    model = steered_tiny(source, ["attention", "ffn", "ffn_inner"], 40)
    steered = logits(model, tiny_ids)
    result = write_merged_gguf(model, source, tmp_path / "merged.gguf")
    assert {change.name for change in result.changes} == {
        f"blk.{layer}.{kind}.weight" for layer in (0, 1) for kind in ("attn_output", "ffn_down")}
    assert {c.scaled for c in result.changes if "ffn_down" in c.name} == {"rows+columns"}  # ffn rows, ffn_inner columns
    assert result.type_changes == [] and all(c.max_error == 0.0 for c in result.changes)
    torch.testing.assert_close(logits(load_gguf_model(tmp_path / "merged.gguf"), tiny_ids), steered, rtol=0, atol=1e-5)


def test_quantized_merge_keeps_what_it_does_not_touch(tmp_path, tiny_ids):
    source = write_tiny_gguf(tiny_llama(), tmp_path / "tiny.gguf", MIXED)
    model = steered_tiny(source, ["attention", "ffn"], 30)
    steered = logits(model, tiny_ids)
    with model.disable_adapter():
        plain = logits(model, tiny_ids)
    result = write_merged_gguf(model, source, tmp_path / "merged.gguf")

    before, after = gguf.GGUFReader(source), gguf.GGUFReader(tmp_path / "merged.gguf")
    assert list(before.fields) == list(after.fields)
    for key, field in before.fields.items():  # tokenizer arrays, chat template, hyperparameters: unchanged
        assert field.types == after.fields[key].types and field.contents() == after.fields[key].contents(), key
    old, new = tensors(source), tensors(tmp_path / "merged.gguf")
    assert list(old) == list(new)
    touched = {change.name: change for change in result.changes}
    assert result.n_copied == len(old) - len(touched) > 0
    for name, tensor in old.items():
        if name not in touched:
            assert new[name].tensor_type == tensor.tensor_type and np.array_equal(raw_bytes(new[name]),
                                                                                  raw_bytes(tensor)), name
    # Q4_K cannot be encoded by gguf: it becomes Q8_0 and is reported; every other touched tensor keeps its type.
    assert [(c.name, c.source_type, c.written_type) for c in result.type_changes] == [
        ("blk.1.ffn_down.weight", "Q4_K", "Q8_0")]
    assert all(new[name].tensor_type.name == change.written_type for name, change in touched.items())

    # The written weights are what transformers reloads: replacing the touched weights of the merged transformers
    # model by the dequantized written tensors gives the reloaded file's logits.
    reloaded = load_gguf_model(tmp_path / "merged.gguf")
    merged = model.merge_and_unload()
    reloaded_weights = dict(reloaded.named_parameters())
    with torch.no_grad():
        for name, parameter in merged.named_parameters():
            parameter.copy_(reloaded_weights[name])
    reloaded_logits = logits(reloaded, tiny_ids)
    torch.testing.assert_close(logits(merged, tiny_ids), reloaded_logits, rtol=0, atol=1e-6)
    # Re-encoding errs by at most one quantization step of the written type (block range / levels), and the file
    # stays far nearer the steered model than the unsteered model is.
    for change in result.changes:
        levels = 2 ** BITS[change.written_type] - 1
        assert 0 < change.max_error <= 2 * change.max_abs / levels, change
    assert (reloaded_logits - steered).norm() < (plain - steered).norm() / 2


def test_row_scaling_keeps_the_codes_column_scaling_requantizes(tmp_path):
    """Q4_1 blocks (d, m: float16; 16 bytes of 4-bit codes): scaling rows (ffn) rewrites only d and m of the scaled
    rows; scaling columns (attention) rewrites the codes of the block holding that column in every row."""
    source = write_tiny_gguf(tiny_llama(), tmp_path / "tiny.gguf", {"blk.0.ffn_down": Q.Q4_1,
                                                                     "blk.0.attn_output": Q.Q4_1})
    model = get_peft_model(load_gguf_model(source), AUSteerConfig(sites=["attention", "ffn"]))
    model.set_aus([(("ffn", 0), 5, 0.7), (("ffn", 0), 40, -0.3), (("attention", 0), 9, 0.7)])
    result = write_merged_gguf(model, source, tmp_path / "merged.gguf")
    old, new = tensors(source), tensors(tmp_path / "merged.gguf")

    def blocks(tensor):  # [rows, blocks per row, 20 bytes]
        return raw_bytes(tensor).reshape(tensor.data.shape[0], -1, 20)

    down_old, down_new = blocks(old["blk.0.ffn_down.weight"]), blocks(new["blk.0.ffn_down.weight"])
    assert np.array_equal(down_old[:, :, 4:], down_new[:, :, 4:])  # every 4-bit code unchanged
    changed_rows = np.flatnonzero((down_old != down_new).any(axis=(1, 2)))
    assert changed_rows.tolist() == [5, 40]
    attention_old, attention_new = blocks(old["blk.0.attn_output.weight"]), blocks(new["blk.0.attn_output.weight"])
    changed = (attention_old != attention_new).any(-1)  # [rows, blocks]
    assert changed[:, 9 // 32].mean() > 0.5 and not changed[:, [b for b in range(2) if b != 9 // 32]].any()
    assert (attention_old[:, 0, 4:] != attention_new[:, 0, 4:]).any()  # codes re-rounded
    errors = {change.scaled: change.max_error / change.max_abs for change in result.changes}
    assert errors["rows"] < 2 ** -10 < errors["columns"]  # float16 rounding of d, m vs a new 4-bit rounding


def test_refusals(tmp_path):
    source = write_tiny_gguf(tiny_llama(), tmp_path / "tiny.gguf", ALL_F32)
    residual = get_peft_model(load_gguf_model(source), AUSteerConfig(sites=["residual"]))
    residual.set_aus([(("residual", 0), 1, 1.0)])
    with pytest.raises(ValueError, match="residual"):
        write_merged_gguf(residual, source, tmp_path / "out.gguf")
    scoped = get_peft_model(load_gguf_model(source), AUSteerConfig(sites=["ffn"], scope="generated"))
    scoped.set_aus([(("ffn", 0), 1, 1.0)])
    with pytest.raises(ValueError, match="scope='generated'"):
        write_merged_gguf(scoped, source, tmp_path / "out.gguf")
    with pytest.raises(ValueError, match="is the source GGUF"):
        write_merged_gguf(scoped, source, source)
    with pytest.raises(ValueError, match="neither a GGUF file nor a model alias"):
        merge_to_gguf(tmp_path, tmp_path, tmp_path / "out.gguf")
    # A base loaded otherwise than from this file (here: other weights) is refused, not merged along wrong axes.
    other = write_tiny_gguf(tiny_llama(seed=1), tmp_path / "other.gguf", ALL_F32)
    model = get_peft_model(load_gguf_model(other), AUSteerConfig(sites=["ffn"]))
    model.set_aus([(("ffn", 0), 1, 1.0)])
    with pytest.raises(ValueError, match="does not dequantize to the weight transformers loaded"):
        write_merged_gguf(model, source, tmp_path / "out.gguf")


def test_cli_merge_gguf(tmp_path, capsys, tiny_ids):
    source = write_tiny_gguf(tiny_llama(), tmp_path / "tiny.gguf", MIXED)
    model = steered_tiny(source, ["attention", "ffn"], 20)
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)  # no embeddings to check for
    out = tmp_path / "steered.gguf"
    assert main(["merge", "--model", str(source), "--adapter", str(tmp_path / "adapter"), "--gguf", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "blk.1.ffn_down.weight" in printed and "TYPE CHANGED Q4_K -> Q8_0" in printed
    assert "1 tensors changed type" in printed
    assert main(["merge", "--model", str(source), "--adapter", str(tmp_path / "adapter"), "--gguf", str(out)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["merge", "--model", str(source), "--adapter", str(tmp_path / "adapter"), "--gguf", str(out),
                 "--force", "--dtype", "float16"]) == 1
    assert "--dtype applies to --output only" in capsys.readouterr().err
