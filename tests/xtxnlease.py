"""Constants the cross-group lease transaction tests share (test_lease_xtxn.py,
test_xtxn_leases.py): a lease homed in group HOME, a key group OTHER, two transaction ids and
a start revision."""

from hypothesis import strategies as st

from kvstore.storage import leases, mvcc
from kvstore.storage.xtxn import TxnId

HOME, OTHER = 3, 5
LID = leases.make_id(HOME, 4242)
T1, T2 = TxnId(1, 1), TxnId(2, 2)
START = mvcc.make_revision(mvcc.EPOCH_MS + 1000, 0, 0)


def mangled(raw: bytes, data: st.DataObject) -> tuple[bytes, bytes, bytes]:
    """`raw` with one byte changed, cut short, and with bytes appended (the draws from `data`):
    what the decoders' totality tests feed them."""
    b = bytearray(raw)
    i = data.draw(st.integers(0, len(b) - 1))
    b[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(b)))
    tail = data.draw(st.binary(max_size=20))
    return bytes(b), bytes(b[:cut]), bytes(b) + tail
