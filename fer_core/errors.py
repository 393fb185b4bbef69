"""Errors that carry a message meant for the user: the CLI prints them on one line and the
app shows them as they are."""


class FerError(Exception):
    """Base class: something the user can fix, explained in words."""


class DataError(FerError):
    """The dataset cannot be used as given."""


class ConfigError(FerError):
    """A configuration value is out of range."""


class CheckpointError(FerError):
    """A checkpoint file cannot be loaded as a model of this project."""


class ImageInputError(FerError):
    """An image (bytes, file or URL) cannot be decoded or fetched."""
