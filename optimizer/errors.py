"""The optimizer's exception hierarchy.

Every error a user can cause (a bad folder, bad data, an impossible budget) is an
:class:`OptimizerError` whose message names the value, the limit and the fix; the CLI prints
it without a traceback and exits with status 2. Anything else is a bug.
"""

from __future__ import annotations


class OptimizerError(Exception):
    """Base class of every user-facing optimizer error."""


class ConfigError(OptimizerError):
    """A configuration value is out of range or inconsistent with another.

    ``key`` names the setting to blame (``budget.head_fraction``) when there is one, so the CLI
    can name the flag the user typed (``--heads``) instead of only the config key.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ModelLoadError(OptimizerError):
    """The model folder is missing, incomplete, or of an architecture we cannot prune."""


class DataError(OptimizerError):
    """The data file is missing, empty or malformed, or its labels do not fit the model."""


class BudgetError(OptimizerError):
    """The requested pruning budget or quality floor cannot be met."""


class CheckpointError(OptimizerError):
    """A pruned checkpoint is missing files or does not match its pruning record."""


class ExportError(OptimizerError):
    """ONNX export failed or the exported graph disagrees with the PyTorch model."""


class FusionError(OptimizerError):
    """ONNX Runtime's transformer optimizer did not fuse what the model's structure requires."""


class QuantizationError(OptimizerError):
    """Quantization could not meet the quality floor with any tried setting."""


class ValidationError(OptimizerError):
    """The final artifact failed a validation check against the original model."""
