"""The errors a checkpoint raises (a leaf: the files, the parts and the first format's reader all raise them)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint file is missing, empty, truncated or corrupt (``resume=auto`` falls back to an older one)."""
