"""fitting/inputs.py, the one place for model inputs: padding on either side, common prefixes, batch inputs, the
single-process case of the data-parallel split (the layers are checked in tests/test_layout.py)."""

from __future__ import annotations

import os

import pytest
import torch

from austeer_peft.fitting import inputs


def test_pad_left_and_right_with_masks_and_position_ids_from_the_first_real_token():
    left = inputs.pad([[5, 6, 7], [8]], pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    right = inputs.pad([[5, 6, 7], [8]], pad_id=2, padding_side="right")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert all(tensor.dtype == torch.long for tensor in left.values())
    with pytest.raises(ValueError, match="'left' or 'right'"):
        inputs.pad([[1]], pad_id=0, padding_side="middle")


def test_batch_model_inputs_leave_out_position_ids_for_models_without_them():
    (batch,) = inputs.make_batches([([1, 2, 3], [1, 2])], batch_size=4, pad_id=0, padding_side="left")
    assert batch.last_token.tolist() == [2, 2]
    with_positions = batch.model_inputs(torch.device("cpu"))
    assert set(with_positions) == {"input_ids", "attention_mask", "position_ids", "use_cache"}
    assert with_positions["use_cache"] is False
    assert "position_ids" not in batch.model_inputs(torch.device("cpu"), position_ids=False)


@pytest.mark.parametrize("a, b", [("abc", "abd"), ("abc", "abc"), ("", "x"), ("yes", "no"), ("ab", "abcd")])
def test_common_prefix_length_of_strings_and_token_ids(a, b):
    assert inputs.common_prefix_length(a, b) == len(os.path.commonprefix([a, b]))
    assert inputs.common_prefix_length([ord(c) for c in a], [ord(c) for c in b]) == len(os.path.commonprefix([a, b]))


def test_a_single_process_fits_alone_and_is_the_main_process():
    assert inputs.data_parallel_share(None, [([1], [2])], [], batch_size=1) is None
    assert inputs.is_main_process()
