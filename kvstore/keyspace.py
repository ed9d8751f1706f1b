"""The order of user keys: the one `prefix_end`, for every layer (client, server, node, etcd's
API). STANDARD LIBRARY ONLY (no imports at all: anything may import it)."""


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key with `prefix` (None: no upper bound, as for the
    empty prefix or one of only 0xff bytes)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])
