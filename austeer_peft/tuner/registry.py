"""Registration of AUSteer with PEFT: the one change ``import austeer_peft`` makes outside the package.

PEFT (0.21) only lets ``register_peft_method`` accept names that are already members of its closed ``PeftType``
enum, and its loaders (``PeftConfig.from_pretrained``, ``PeftModel.from_pretrained``, ``AutoPeftModel*``) look the
type up through that enum. A Python ``Enum`` cannot be extended through its public API, so this module adds one
member through the enum's internals that CPython documents (``_member_map_``, ``_value2member_map_``,
``_member_names_``) and then checks that every public way of reaching a member finds it. If a future PEFT or Python
changes those internals, the check raises at import time instead of leaving a half-registered method behind.
``register_peft_method`` then fills PEFT's own mapping dicts (type -> config class, tuner class, prefix).

Separate from the config and the tuner, and importing neither, so that both can use the enum member while
``austeer_peft.tuner`` (its ``__init__``) registers the two classes once both exist.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method

AUSTEER_TYPE_NAME = "AUSTEER"
AUSTEER_PREFIX = "austeer_"


def add_peft_type_member(name: str = AUSTEER_TYPE_NAME) -> PeftType:
    """Add ``name`` as a member of ``PeftType`` (idempotent) and return it."""
    if name in PeftType.__members__:
        return PeftType[name]
    if not issubclass(PeftType, str):
        raise RuntimeError(
            "peft.utils.PeftType is no longer a str Enum; austeer_peft.tuner.registry must be updated for this PEFT "
            "version."
        )
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses to (re)bind members
    check_peft_type_member(name)
    return member


def check_peft_type_member(name: str = AUSTEER_TYPE_NAME) -> None:
    """Raise if ``name`` is not reachable through every lookup PEFT uses."""
    problems = []
    if getattr(PeftType, name, None) is None:
        problems.append(f"PeftType.{name} attribute is missing")
    try:
        by_value = PeftType(name)
    except ValueError:
        by_value = None
        problems.append(f"PeftType({name!r}) fails")
    if by_value is not None and by_value is not PeftType.__members__.get(name):
        problems.append("lookup by value and by name give different objects")
    if name not in [m.value for m in PeftType]:
        problems.append("iterating PeftType does not yield the member")
    if problems:
        raise RuntimeError(
            "Could not add AUSTEER to peft.utils.PeftType (" + "; ".join(problems) + "). The enum internals of this "
            "PEFT/Python version differ from what austeer_peft.tuner.registry expects; pin peft==0.21.* or update it."
        )


def register_austeer(config_cls: type, model_cls: type) -> None:
    """Register AUSteer's config and tuner classes with PEFT under ``PeftType.AUSTEER`` (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = add_peft_type_member()
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name=AUSTEER_TYPE_NAME.lower(), config_cls=config_cls, model_cls=model_cls,
                         prefix=AUSTEER_PREFIX)
