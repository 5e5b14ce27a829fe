"""User-facing errors: the CLI prints these as one clear message instead of a stack trace."""


class DiffpruneError(Exception):
    """A problem with what the user asked for (bad input, missing data, wrong file), not a bug."""
