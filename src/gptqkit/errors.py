"""One exception family. Every message says what was wrong and what to do about it."""


class GPTQKitError(Exception):
    """Base class of every error gptqkit raises on purpose."""


class ConfigError(GPTQKitError, ValueError):
    """A quantization setting is invalid or cannot be honoured for this model."""


class ModelLoadError(GPTQKitError):
    """The model could not be found or read."""


class CalibrationError(GPTQKitError, ValueError):
    """Calibration or evaluation text is missing, too short or unreadable."""


class CheckpointError(GPTQKitError):
    """A checkpoint on disk is incomplete, corrupted or in an unknown format."""


class NumericalError(GPTQKitError, FloatingPointError):
    """NaN/Inf in weights or activations, or a factorization that cannot be repaired."""


class BackendError(GPTQKitError):
    """A kernel backend was asked for that cannot run this layer on this device."""


class DiskFullError(CheckpointError, OSError):
    """Writing the output ran out of disk space (or hit another OS write error)."""


class ResumeError(CheckpointError):
    """`resume` was asked for, but the unfinished run on disk belongs to different inputs."""


class InterruptedRunError(GPTQKitError, KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during quantization; the finished blocks are kept for `resume`.

    Also a KeyboardInterrupt, so code that lets Ctrl-C through keeps doing so."""
