"""The project's errors: one base class, and one class per kind of thing that went wrong.

Every error here is bad input or a bad environment, named in its message with what to do;
the CLI prints it as one line. Anything else that reaches the CLI is a bug and keeps its
traceback. :class:`CrateAlphaError` stays a ``ValueError``, so that code which catches
``ValueError`` around a call (timm's and open_clip's factories, argparse's ``type=``, older
callers of this package) still sees our refusals.

The lowest layer of the package: it imports nothing of crate_alpha's.
"""
from __future__ import annotations

__all__ = [
    "CrateAlphaError", "RecipeError", "DataError", "CheckpointError", "ModelConfigError", "ConversionError",
    "HubError", "WhiteboxError", "RunFolderError", "EvalError", "ClassMismatch", "DamagedImage", "XlaUnavailable",
]


class CrateAlphaError(ValueError):
    """Bad input to a command: the message names the problem and what to do."""


class RecipeError(CrateAlphaError):
    """A recipe or one of its overrides that cannot be used."""


class DataError(CrateAlphaError):
    """A data path, shard, metadata file or dataset that cannot be read, written or used."""


class CheckpointError(CrateAlphaError):
    """A checkpoint, weights file or model folder that is missing, unreadable, unsafe or does not fit the model."""


class ModelConfigError(CrateAlphaError):
    """A model name, shape or option that no model can be built from."""


class ConversionError(CrateAlphaError):
    """Released weights or a conversion request that cannot be turned into a model folder."""


class HubError(CrateAlphaError):
    """A Hugging Face Hub file or model that cannot be had."""


class WhiteboxError(CrateAlphaError):
    """Bad input to a white-box command (explain, diagnose, segment-eval)."""


class RunFolderError(CrateAlphaError):
    """A run folder that is not this command's to write, or is in use."""


class EvalError(CrateAlphaError):
    """A zero-shot evaluation that did not give a result, or a result file that cannot be read."""


class ClassMismatch(CrateAlphaError):
    """Evaluation data whose classes are not the ones the model's head was trained on."""


class DamagedImage(DataError):
    """An image file or shard member that does not decode."""


class XlaUnavailable(CrateAlphaError):
    """device=xla cannot run here: torch_xla or an XLA device is missing."""
