"""Loaders of the local example tasks: each reads the JSON Lines file beside this one, so the
tasks run offline from any working directory (lm-eval's `custom_dataset`)."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _split(name: str, **_: object) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(HERE / name)})


def choice(**kwargs: object) -> datasets.DatasetDict:
    return _split("docstring_choice.jsonl", **kwargs)


def rolling(**kwargs: object) -> datasets.DatasetDict:
    return _split("docstring_rolling.jsonl", **kwargs)
