"""Data sets from the Hugging Face Hub through ``datasets.load_dataset``: user data named ``name[:config]`` and the
public copies the built-in tasks fall back to when no local data folder is found.

One place for it, so that every Hub read fails the same clear way: ``load_dataset`` reads the local datasets cache
first (it works with ``HF_HUB_OFFLINE=1`` once a data set has been downloaded), and when neither the network nor the
cache has the data set the error says so and names the fixes, instead of a ``ConnectionError`` from deep inside
``datasets``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

from datasets import Dataset, load_dataset


class HubSource(NamedTuple):
    """A public data set on the Hub: its id and configuration (``load_dataset(name, config)``)."""

    name: str
    config: Optional[str] = None

    def __str__(self) -> str:
        return self.name if self.config is None else f"{self.name}:{self.config}"


def parse_hub_name(text: str) -> HubSource:
    """``"name[:config]"`` (``"nyu-mll/glue:sst2"``) as a :class:`HubSource`."""
    name, _, config = text.partition(":")
    if not name or (":" in text and not config):
        raise ValueError(f"Hub data set {text!r} is not of the form name[:config], e.g. 'nyu-mll/glue:sst2'.")
    return HubSource(name, config or None)


def load_hub_splits(source: HubSource, splits: Sequence[str]) -> dict[str, Dataset]:
    """The named splits of a Hub data set (``split`` strings as ``load_dataset`` takes them: ``"train"``,
    ``"train[:2000]"``), each a ``datasets.Dataset``."""
    loaded = {}
    for split in dict.fromkeys(splits):
        try:
            dataset = load_dataset(source.name, source.config, split=split)
        except ConnectionError as error:
            raise ConnectionError(offline_message(source, error)) from None
        except ValueError as error:  # an unknown split or configuration: the user's to fix, said by datasets
            raise ValueError(f"Hub data set {source}: {_first_line(error)}") from None
        except FileNotFoundError as error:  # DatasetNotFoundError: no such repository (or it is gated)
            raise FileNotFoundError(f"Hub data set {source} was not found ({_first_line(error)}); check the name "
                                    "(name[:config], e.g. 'nyu-mll/glue:sst2').") from None
        if not isinstance(dataset, Dataset):
            raise ValueError(f"Hub data set {source}, split {split!r}: expected one split, got "
                             f"{type(dataset).__name__}.")
        loaded[split] = dataset
    return loaded


def offline_message(source: HubSource, error: BaseException) -> str:
    """One line: the Hub data set is neither reachable nor in the local datasets cache, and how to fix that."""
    from datasets import config as datasets_config

    offline = " (HF_HUB_OFFLINE=1 is set)" if datasets_config.HF_HUB_OFFLINE else ""
    return (f"Cannot load the Hub data set {source}: the Hub cannot be reached{offline} and the datasets cache "
            f"({datasets_config.HF_DATASETS_CACHE}) has no copy ({_first_line(error)}). Fix: run once with network "
            f"access to cache it (then it works offline), or give local files (--data FILE, or --data-dir / "
            f"$AUSTEER_DATA for the built-in tasks).")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
