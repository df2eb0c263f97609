"""Exception types. Each carries enough context (key, tensor, file) to act on."""


class MixqError(Exception):
    """Base class of mixq's own errors."""


class ConfigError(MixqError, ValueError):
    """The mixed-precision config (YAML or flags) is invalid."""


class CheckpointError(MixqError, ValueError):
    """A checkpoint is missing, unreadable, or does not hold what it should."""


class UnsupportedFormatError(CheckpointError):
    """A checkpoint uses a quantization format or option mixq does not serve."""
