"""The one error type of checkpoint reading, so callers can tell a bad file from a bug."""


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match the model; the message names it."""
