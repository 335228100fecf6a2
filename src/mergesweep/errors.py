"""Errors users fix without reading code: every message names the config key, file or tensor."""


class MergesweepError(Exception):
    """Base class; the CLI prints the message and exits with status 1 (no traceback)."""


class ConfigError(MergesweepError, ValueError):
    """A configuration value is missing or invalid. The message starts with the key path."""


class MergeError(MergesweepError, ValueError):
    """A merge cannot proceed (shape mismatch, missing tensor, NaN, bad parameter)."""


class DeviceError(ConfigError):
    """A device or precision cannot be used on this machine (or is misspelled); the message names
    the option and what the machine has (:mod:`mergesweep.devices`)."""
