"""One exception type for every user-facing failure, so the CLI can print one line and exit 2."""


class SponError(Exception):
    """A clear, user-facing error: bad input, unsupported model, diverged training."""
