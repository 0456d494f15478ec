"""One exception tree. Translated to exit codes / HTTP / job failures only at the boundary."""


class LinearizeError(Exception):
    """Base of every error the engine raises on purpose."""

    exit_code = 3
    code = "runtime_error"


class InputError(LinearizeError):
    """The user's input is invalid: a bad flag, path, budget or file."""

    exit_code = 2
    code = "bad_input"


class DataError(InputError):
    """Text data is missing, empty, not UTF-8, or too short for the requested tokens."""

    code = "bad_data"


class ModelSourceError(InputError):
    """A model cannot be found or loaded from the given source."""

    code = "bad_model"


class UnsupportedArchitectureError(InputError):
    """The model type is not in the architecture registry."""

    code = "unsupported_architecture"


class UnsupportedQuantizationError(InputError):
    """The source is stored in a quantized format that cannot be dequantized here."""

    code = "unsupported_quantization"


class BudgetError(InputError):
    """The layer budget cannot be met for this model."""

    code = "bad_budget"


class FoldError(InputError):
    """The requested output format cannot represent this replacement exactly."""

    code = "fold_impossible"


class OutputExistsError(InputError):
    """The output directory exists and is not empty (use --force)."""

    code = "output_exists"


class VerificationError(LinearizeError):
    """The reloaded checkpoint does not reproduce the in-memory model."""

    code = "verification_failed"


class Cancelled(LinearizeError):
    """The job was cancelled between two pipeline steps."""

    code = "cancelled"
