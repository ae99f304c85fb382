"""Errors that icrewrite reports to users: one clear line, no traceback in the CLI."""


class ICRewriteError(Exception):
    """Base class: the message is complete and meant for the user."""


class ConversionError(ICRewriteError):
    """A model cannot be planned or converted as asked."""


class CheckpointError(ICRewriteError):
    """A checkpoint file is unsafe, corrupt or does not fit the model."""


class ExportError(ICRewriteError):
    """A model cannot be exported or the export does not verify."""


class DataError(ICRewriteError):
    """A data set cannot be found, read or used as asked."""


class TrainingError(ICRewriteError):
    """Training cannot start or continue as asked."""


class LossNotFinite(TrainingError):
    """The loss became NaN or infinite; the run stopped before applying that step."""
