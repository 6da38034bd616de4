"""The one error of `rlp_jax.fetch`."""


class FetchError(RuntimeError):
    """A model could not be fetched (one line, says what to do)."""
