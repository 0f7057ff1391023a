"""Registration with PEFT: AUSTEER joins the closed PeftType enum, and every PEFT loader resolves it."""

import enum

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

from austeer_peft.tuner import registry
from austeer_peft.tuner.config import AUSteerConfig
from austeer_peft.tuner.model import AUSteerModel


def test_peft_type_member_is_reachable_every_way():
    member = PeftType.AUSTEER
    assert member is PeftType("AUSTEER") is PeftType["AUSTEER"]
    assert member.value == "AUSTEER" and member == "AUSTEER"
    assert "AUSTEER" in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is AUSteerConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is AUSteerModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "austeer_"


def test_registration_is_idempotent():
    registry.register_austeer(AUSteerConfig, AUSteerModel)
    assert registry.add_peft_type_member() is PeftType.AUSTEER
    assert sum(1 for m in PeftType if m.value == "AUSTEER") == 1


def test_peft_config_from_pretrained_resolves_type(tmp_path):
    AUSteerConfig(sites=["ffn"], k=3, alpha=2.0).save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, AUSteerConfig)
    assert loaded.peft_type is PeftType.AUSTEER and loaded.sites == ["ffn"] and loaded.k == 3


class _DropWrites(dict):
    """Stands in for enum internals that a future Python/PEFT might no longer let us write to."""

    def __setitem__(self, key, value):
        pass


def test_changed_enum_internals_fail_loudly(monkeypatch):
    class FutureType(str, enum.Enum):
        LORA = "LORA"

    monkeypatch.setattr(FutureType, "_value2member_map_", _DropWrites(FutureType._value2member_map_))
    monkeypatch.setattr(registry, "PeftType", FutureType)
    with pytest.raises(RuntimeError, match="Could not add AUSTEER"):
        registry.add_peft_type_member("AUSTEER")


def test_non_str_enum_fails_loudly(monkeypatch):
    class FutureType(enum.Enum):
        LORA = "LORA"

    monkeypatch.setattr(registry, "PeftType", FutureType)
    with pytest.raises(RuntimeError, match="no longer a str Enum"):
        registry.add_peft_type_member("AUSTEER")
