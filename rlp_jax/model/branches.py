"""`Branches`: where each thought branch hangs off its document's prefix, the same type in every model family."""

from __future__ import annotations

import flax.struct
import jax


@flax.struct.dataclass
class Branches:
    """Where each branch hangs off its document's prefix (all [B, N] int32).

    start: prefix indices < start are visible. segment: only prefix tokens of this segment are visible.
    position: rotary position of the branch's first token (later tokens continue from it).
    """

    start: jax.Array
    segment: jax.Array
    position: jax.Array
