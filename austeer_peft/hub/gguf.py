"""Merged GGUF: fold an AUSteer adapter into a GGUF model file for llama.cpp, Ollama and LM Studio.

These runtimes load neither PEFT adapters nor safetensors, and their own steering (control vectors) only adds a
vector, so an AUSteer adapter reaches them folded into the weights of a GGUF file. :func:`merge_to_gguf` starts from
a GGUF file and changes as little of it as it can: every tensor the adapter does not touch is copied byte for byte,
with its type, and every metadata field (tokenizer, chat template, ...) is copied as it is. A touched tensor is
dequantized, scaled and re-encoded in its own type where the ``gguf`` package can encode it (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1), else (K-quants, I-quants) in Q8_0; inside a tensor re-encoded in its own type, the blocks
the scale does not change keep their bytes too.

Why row scaling survives block quantization and column scaling does not. GGUF stores a linear weight ``W [out, in]``
row by row (``ne = [in, out]``) and quantizes each row in blocks of 32 (256 for K-quants) consecutive *input*
entries, each block holding its own scale (``Q4_1``: ``x ≈ d·q + m``). The ``ffn`` site scales rows of the MLP's
down projection (its output dimensions): every block of a scaled row is multiplied by the same factor c, so
re-encoding finds the same integer codes q and a scale c·d (and offset c·m); the only new error is the float16
rounding of c·d, about 2⁻¹¹ of the block's range. The ``attention`` and ``ffn_inner`` sites scale *columns* (input
dimensions of ``o_proj`` / ``down_proj``): one entry in a block of 32 changes, which can change the block's range and
so re-round the 31 others, and the scaled entry itself lands on the block's grid of 16 (4-bit) levels; the error is
of the order of a quantization step, like quantizing the weight anew. bench/bench_gguf.py measures both.

Names: adapter modules are transformers module names; ``gguf``'s own tensor name map (the one llama.cpp's converter
and transformers' GGUF loader use) turns them into GGUF names (``model.layers.3.self_attn.o_proj`` ->
``blk.3.attn_output``). Before scaling, each touched GGUF tensor is checked to dequantize to exactly the weight
transformers loaded from the same file, so a layout the converter changed (Llama's Q/K head permutation: ``q_proj``
and ``k_proj`` only; the sites here touch ``o_proj`` and ``down_proj``, which are stored as they are) is refused
rather than scaled along the wrong axis.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from ..tuner.sites import base_named_modules, merge_slices, unwrap
from .facts import austeer_tuner

PathLike = Union[str, os.PathLike]
FALLBACK_TYPE = "Q8_0"  # encoding of touched tensors whose own type the gguf package cannot encode


@dataclass(frozen=True)
class TensorChange:
    """One re-encoded GGUF tensor."""

    name: str  # GGUF tensor name, e.g. blk.3.ffn_down.weight
    source_type: str  # its type in the source file
    written_type: str  # its type in the written file
    scaled: str  # "rows", "columns", "rows+columns" (of the [out, in] weight) or "entries" (a bias)
    n_scaled: int  # number of scaled rows / columns / entries
    changed_blocks: float  # fraction of the tensor's quantization blocks whose bytes changed
    max_error: float  # max |written - exact| after dequantizing the written tensor (exact: source * factors)
    max_abs: float  # max |exact|, the scale of the weights, to read max_error against


@dataclass
class GgufMerge:
    """What :func:`merge_to_gguf` wrote."""

    output: Path
    source: Path
    changes: list[TensorChange] = field(default_factory=list)
    n_copied: int = 0  # tensors copied byte for byte

    @property
    def type_changes(self) -> list[TensorChange]:
        return [change for change in self.changes if change.written_type != change.source_type]


def gguf_source(model: PathLike) -> Path:
    """The GGUF file of ``model``: an alias of ``austeer_peft.models.MODEL_ALIASES`` or a path to a ``.gguf`` file."""
    from .models import MODEL_ALIASES, resolve_alias

    if str(model) in MODEL_ALIASES:
        folder, name = resolve_alias(str(model))
        return folder / name
    path = Path(model)
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise ValueError(f"{model!r} is neither a GGUF file nor a model alias ({', '.join(MODEL_ALIASES)}); a GGUF "
                         "merge starts from a GGUF file. For a transformers checkpoint use `austeer merge --output` "
                         "(safetensors), then llama.cpp's convert_hf_to_gguf.py.")
    return path


def load_gguf_model(path: PathLike):
    """The model of a GGUF file as transformers loads it: dequantized to float32, in eval mode. A merge needs
    exactly these weights (it checks each touched tensor against them)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    return model.eval()


def merge_to_gguf(model: PathLike, adapter: PathLike, output_path: PathLike, *,
                  adapter_name: Optional[str] = None) -> GgufMerge:
    """Write a GGUF file of ``model`` with the AUSteer ``adapter`` folded into its weights. This is
    ``austeer merge --gguf``.

    Args:
        model: the source GGUF: a ``.gguf`` file or a model alias (the adapter must have been fitted on this model).
        adapter: the AUSteer adapter: a local folder or a Hub id.
        output_path: the GGUF file to write.
        adapter_name: the adapter inside ``adapter`` to merge (default: the one at its top level).
    """
    from peft import PeftModel

    source = gguf_source(model)
    base = load_gguf_model(source)
    kwargs = {"adapter_name": adapter_name} if adapter_name else {}
    peft_model = PeftModel.from_pretrained(base, str(adapter), **kwargs)
    return write_merged_gguf(peft_model, source, output_path, adapter_name=adapter_name)


def write_merged_gguf(peft_model, source: PathLike, output_path: PathLike, *,
                      adapter_name: Optional[str] = None) -> GgufMerge:
    """Write ``source`` (the GGUF file ``peft_model``'s base was loaded from, in float32) with the PeftModel's AUSteer
    adapter folded into the tensors it touches; see the module docstring."""
    import gguf

    source, output_path = Path(source), Path(output_path)
    if output_path.resolve() == source.resolve():
        raise ValueError(f"The output {output_path} is the source GGUF; write the merged model to another file.")
    factors = _weight_factors(peft_model, adapter_name)
    reader = gguf.GGUFReader(source)
    arch = str(reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    gguf_names = _gguf_names(reader, arch, factors)

    result = GgufMerge(output=output_path, source=source)
    writer = gguf.GGUFWriter(output_path, arch, endianess=reader.endianess)
    for key, reader_field in reader.fields.items():
        if key == gguf.Keys.General.ARCHITECTURE or key.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value_type = reader_field.types[0]
        sub_type = reader_field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, reader_field.contents(), value_type, sub_type=sub_type)
        if key == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(reader_field.contents())
    payloads = []
    for tensor in reader.tensors:
        data, qtype = tensor.data, tensor.tensor_type
        if tensor.name in gguf_names:
            parameter, row, col = gguf_names[tensor.name]
            data, qtype, change = _reencode(tensor, parameter, row, col)
            result.changes.append(change)
        else:
            result.n_copied += 1
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, qtype)
        payloads.append(data)
    missing = sorted(set(gguf_names) - {change.name for change in result.changes})
    if missing:
        raise ValueError(f"The adapter scales tensors that {source} does not hold: {missing}.")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in payloads:
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    return result


# ---------------------------------------------------------------------------------------------------- factors


Factors = dict[str, tuple[nn.Parameter, torch.Tensor, torch.Tensor]]


def _weight_factors(peft_model, adapter_name: Optional[str]) -> Factors:
    """Parameter name -> (parameter, row factors [out], column factors [in]) of every weight and bias the adapter
    scales; a bias gets its factors as rows, [out], with a column factor of [1]."""
    tuner = austeer_tuner(peft_model)
    adapter_name = adapter_name or peft_model.active_adapters[0]
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"No adapter named {adapter_name!r}; adapters: {sorted(peft_model.peft_config)}.")
    scope = getattr(peft_model.peft_config[adapter_name], "scope", "all")
    if scope != "all":
        raise ValueError(f"Adapter {adapter_name!r} has scope={scope!r}: it steers only some token positions, which "
                         "no change of the weights reproduces. Only scope='all' adapters can be merged into a GGUF.")
    names_of = {id(unwrap(module)): name for name, module in base_named_modules(tuner.model).items()}
    factors: Factors = {}

    def scale(owner: nn.Module, name: str, axis: int, index: torch.Tensor, factor: torch.Tensor) -> None:
        parameter = getattr(owner, name)
        key = f"{names_of[id(owner)]}.{name}"
        rows, cols = (parameter.shape[0], parameter.shape[1] if parameter.ndim == 2 else 1)
        _, row, col = factors.setdefault(key, (parameter, torch.ones(rows), torch.ones(cols)))
        target = row if axis == 0 else col
        target[index] = target[index] * factor

    for layer in tuner._layers().values():
        if adapter_name not in layer.austeer_index:
            continue
        index = layer.austeer_index[adapter_name].cpu()
        factor = 1.0 + layer.austeer_gamma[adapter_name].detach().float().cpu()
        for weight_slice in merge_slices(layer.base_layer, layer.candidate):
            if weight_slice.experts or not isinstance(weight_slice.owner, nn.Linear):
                raise ValueError(
                    f"Cannot merge the AUs on {layer.candidate.name} into a GGUF: they fold into "
                    f"{type(weight_slice.owner).__name__} weights, and GGUF merging supports nn.Linear weights only "
                    "(GGUF stacks MoE experts and GPT-2 Conv1D differently). Use `austeer merge --output` "
                    "(safetensors) or keep the adapter unmerged.")
            scale(weight_slice.owner, weight_slice.name, weight_slice.axis, index, factor)
            if weight_slice.bias_name is not None:
                scale(weight_slice.owner, weight_slice.bias_name, 0, index, factor)
    if not factors:
        raise ValueError(f"Adapter {adapter_name!r} has no AUs to merge; set them with `set_aus` or a fit first.")
    return factors


def _gguf_names(reader, arch: str, factors: Factors) -> Factors:
    """GGUF tensor name -> the factors of the transformers parameter it stores, through gguf's tensor name map."""
    import gguf

    model_arch = next((key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch), None)
    if model_arch is None:
        raise ValueError(f"The gguf package does not know the architecture {arch!r} of this file; upgrade `gguf`.")
    n_blocks = int(reader.get_field(f"{arch}.block_count").contents())
    name_map = gguf.get_tensor_name_map(model_arch, n_blocks)
    named = {}
    for key, entry in factors.items():
        module, suffix = key.rsplit(".", 1)
        name = name_map.get_name(module)
        if name is None:
            raise ValueError(f"gguf's tensor name map for {arch!r} has no GGUF name for {module}; cannot merge it.")
        named[f"{name}.{suffix}"] = entry
    return named


# ---------------------------------------------------------------------------------------------------- encoding


def _reencode(tensor, parameter: nn.Parameter, row: torch.Tensor, col: torch.Tensor):
    """(bytes, type, TensorChange) of a GGUF tensor with its rows and columns scaled."""
    import gguf

    qtype = tensor.tensor_type
    n_cols = int(tensor.shape[0])  # ne[0]: the input dimension, along which GGUF lays out blocks
    raw = np.ascontiguousarray(tensor.data).view(np.uint8).reshape(-1, tensor.n_bytes // (tensor.n_elements // n_cols))
    values = gguf.quants.dequantize(raw, qtype)  # [rows, in], or [1, n] for a bias
    expected = parameter.detach().float().cpu().numpy()
    if values.size != expected.size or not np.array_equal(values.reshape(expected.shape), expected):
        raise ValueError(
            f"GGUF tensor {tensor.name} does not dequantize to the weight transformers loaded from it "
            f"({tuple(parameter.shape)}): the converter changed its layout, so AUs cannot be located in it. Load the "
            "model from this GGUF file in float32 (austeer_peft.hub.gguf.load_gguf_model) before merging.")
    if expected.ndim == 2:  # transformers' [out, in] is GGUF's row-major [rows, in]
        exact = expected * row.numpy()[:, None] * col.numpy()[None, :]
    else:
        exact = (expected * row.numpy()).reshape(values.shape)
    written_type = qtype
    try:
        encoded = gguf.quants.quantize(exact, qtype)
    except (NotImplementedError, gguf.quants.QuantError):
        written_type = gguf.GGMLQuantizationType[FALLBACK_TYPE]
        encoded = gguf.quants.quantize(exact, written_type)
    encoded = np.ascontiguousarray(encoded).view(np.uint8).reshape(raw.shape[0], -1)
    block_size, type_size = gguf.GGML_QUANT_SIZES[written_type]
    changed = (exact != values).reshape(raw.shape[0], -1, block_size).any(-1)  # [rows, blocks per row]
    if written_type == qtype:  # blocks the factors leave alone keep their bytes
        blocks = encoded.reshape(raw.shape[0], -1, type_size)
        blocks[~changed] = raw.reshape(raw.shape[0], -1, type_size)[~changed]
    error = np.abs(gguf.quants.dequantize(encoded, written_type) - exact)
    scaled_rows, scaled_cols = int((row != 1).sum()), int((col != 1).sum())
    kind = "entries" if len(tensor.shape) == 1 else "+".join(
        k for k, n in (("rows", scaled_rows), ("columns", scaled_cols)) if n)
    change = TensorChange(tensor.name, qtype.name, written_type.name, kind, scaled_rows + scaled_cols,
                          float(changed.mean()), float(error.max()), float(np.abs(exact).max()))
    return encoded.reshape(*tensor.data.shape[:-1], -1), written_type, change  # the reader's layout, in bytes
