"""The one way checkpoint files are read: `torch.load(weights_only=True)`, DeepSpeed's too.

A pickle can run code as it is read, and a checkpoint may come from anyone; its manifest does not
help, since whoever sends it can rewrite that. So every checkpoint file is read with torch's
weights-only unpickler, which builds tensors and plain containers and refuses every other global.
DeepSpeed's own loads (its `TorchCheckpointEngine` passes `weights_only=False`) are routed here:
the engine's checkpoint engine is `train.checkpoint_io.CheckpointFiles`, whose `load` is this
(every DeepSpeed checkpoint read goes through it: model states, ZeRO optimizer partitions, the
state-dict loaders). The only globals allowed beyond torch's own are three plain-data DeepSpeed classes that
its ZeRO optimizer states hold (measured: stages 1-3, fp32 and bf16). A file holding anything
else is refused with one line naming it; nothing in it runs.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from mlra_mega.errors import ConfigError

__all__ = ["UnsafeCheckpoint", "safe_globals", "safe_load"]


class UnsafeCheckpoint(ConfigError):
    """A checkpoint file that is not tensors and plain data (or not a checkpoint file at all)."""


def safe_globals() -> list[type]:
    """DeepSpeed's plain-data classes in its ZeRO optimizer states, nothing more."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler]


def safe_load(path: str | Path, map_location: Any = None) -> Any:
    """`torch.load(path, weights_only=True)` with DeepSpeed's few plain classes; an UnsafeCheckpoint
    (one line, naming the file) for anything that is not tensors and plain data."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = next((line.strip() for line in str(exc).splitlines() if "Unsupported" in line or "GLOBAL" in line),
                      str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise UnsafeCheckpoint("checkpoint", f"{path} holds more than tensors and plain data ({reason[:160]}); "
                               "it was not loaded and nothing in it ran",
                               "resume or export only checkpoints written by mlra_mega; a file from elsewhere "
                               "may run code when it is read") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError) as exc:
        raise UnsafeCheckpoint("checkpoint", f"{path} cannot be read as a checkpoint file "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})",
                               "use a complete checkpoint written by mlra_mega") from None
