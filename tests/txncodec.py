"""Shared by the TXN codec tests (`unit/test_txn.py`, `unit/test_txn_lease.py`): the one rule
that a transaction's encoding exists exactly when `check_txn` accepts it."""

from __future__ import annotations

import pytest

from kvstore.storage.txn import Txn, check_txn, encode_txn


def valid(t: Txn) -> bool:
    """Whether `check_txn` accepts `t` (it raises ValueError on one it refuses)."""
    try:
        check_txn(t)
    except ValueError:
        return False
    return True


def encoded_or_refused(t: Txn) -> bytes | None:
    """`encode_txn(t)` for a transaction `check_txn` accepts; for one it refuses, asserts that
    `encode_txn` refuses it too, with ValueError, and returns None."""
    if not valid(t):
        with pytest.raises(ValueError):
            encode_txn(t)
        return None
    return encode_txn(t)
