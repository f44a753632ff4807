"""One exception type for every refusal, so callers and the CLI can print a single clear line."""


class DamError(ValueError):
    """A DAM recipe, mask file or model set that cannot be merged as asked.

    The message is one line that names the file, the tensor (where there is one) and the fix.
    """
