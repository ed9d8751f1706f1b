"""The one user-key size limit of the store. STANDARD LIBRARY ONLY (no imports at all)."""

MAX_KEY_SIZE = 503
"""Longest user key: LMDB's default maximum key size (511) minus the 8-byte group prefix. The one
key-size limit: the server's `Limits.max_key` may not exceed it, and the client library's default
`max_key_size` is it."""
