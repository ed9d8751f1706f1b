"""Watch replies to serialized `WatchResponse`s (the `KV.Watch` adapter's encoding; no I/O).

Replies of watchers at the same position share their events list (`kvstore.node.watch`): its
events are serialized once (cached by the list's identity, the last `ENCODED_KEEP` lists kept
alive so an id stays theirs) and each response is its own fields followed by those bytes
(protobuf appends a repeated field's elements across concatenated messages). The server's
serializer passes bytes through (`wire.add_services`).
"""

from __future__ import annotations

from collections.abc import Callable

from kvstore import errors
from kvstore.node.watchspec import Reply
from kvstore.storage.changefeed import PUT, Change
from kvstore.v1 import kv_pb2

ENCODED_KEEP = 16
"""Serialized event batches kept for reuse."""


def _plain(r: Reply) -> bool:
    """An event reply with nothing else to say (it may merge with the next of its watch)."""
    return not (r.created or r.canceled or r.error is not None or r.compact_revision or r.resume_revision)


class WatchEncoder:
    """The responses of one node's watch replies (see the module docstring). `plant`: the
    planted bug of `watch_service.PLANT_ENV` (testing kvchaos only; "" normally)."""

    def __init__(self, node_id: int, err: Callable[[errors.KVError], kv_pb2.Error], plant: str = "",
                 plant_every: int = 20) -> None:
        self.node_id = node_id
        self.err = err
        self.plant = plant
        self.plant_every = plant_every
        self._planted = 0
        self._shared: tuple[list[Change], kv_pb2.WatchResponse] | None = None
        """The events list last turned into protobuf, and the response holding them (`response`)."""
        self._encoded: dict[int, tuple[list[Change], bytes]] = {}
        """id of an events list -> the list and its serialized events."""

    def encode_all(self, replies: list[Reply], max_merge: int) -> list[bytes]:
        """The responses of `replies`, in order. Consecutive event replies of one watch (a stream
        that fell behind by several puts) go out as one response of all their events (about
        `max_merge` bytes at most; its revision the last one's: every revision's events are
        still in one response, in order)."""
        if len(replies) == 1 or self.plant:
            return [self.encode(r) for r in replies]
        out: list[bytes] = []
        i, n = 0, len(replies)
        while i < n:
            r = replies[i]
            j = i + 1
            if r.events and _plain(r):
                size = r.size
                while (j < n and replies[j].watch_id == r.watch_id and replies[j].events and _plain(replies[j])
                       and size + replies[j].size <= max_merge):
                    size += replies[j].size
                    j += 1
            if j == i + 1:
                out.append(self.encode(r))
            else:
                last = replies[j - 1]
                head = kv_pb2.WatchResponse(watch_id=r.watch_id, revision=last.revision, node_id=self.node_id)
                out.append(head.SerializeToString() + b"".join(self._events_bytes(x.events) for x in replies[i:j]))
            i = j
        return out

    def _events_bytes(self, events: list[Change]) -> bytes:
        """`events` serialized as a `WatchResponse`'s events field (cached by the list's id)."""
        hit = self._encoded.get(id(events))
        if hit is not None and hit[0] is events:
            return hit[1]
        template = kv_pb2.WatchResponse()
        self._add_events(template, events)
        data = template.SerializeToString()
        enc = self._encoded
        if len(enc) >= ENCODED_KEEP:
            del enc[next(iter(enc))]
        enc[id(events)] = (events, data)
        return data

    def encode(self, r: Reply) -> bytes:
        """The serialized `WatchResponse` of a reply (the server's serializer passes bytes
        through: `wire.add_services`). Replies of watchers at the same position share their
        events list (`WatchHub`): its events are serialized once, and each response is its own
        fields followed by those bytes (protobuf appends a repeated field's elements across
        concatenated messages)."""
        if self.plant:
            return self.response(r).SerializeToString()
        head = kv_pb2.WatchResponse(
            watch_id=r.watch_id, created=r.created, canceled=r.canceled, cancel_reason=r.cancel_reason,
            compact_revision=r.compact_revision, resume_revision=r.resume_revision, revision=r.revision,
            node_id=self.node_id,
        )
        if r.error is not None:
            head.error.CopyFrom(self.err(r.error))
        if not r.events:
            return head.SerializeToString()
        return head.SerializeToString() + self._events_bytes(r.events)

    def response(self, r: Reply) -> kv_pb2.WatchResponse:
        """The `WatchResponse` of a reply. Replies of watchers at the same position share their
        events list (`WatchHub`): its events are built once and merged into each response."""
        resp = kv_pb2.WatchResponse(
            watch_id=r.watch_id, created=r.created, canceled=r.canceled, cancel_reason=r.cancel_reason,
            compact_revision=r.compact_revision, resume_revision=r.resume_revision, revision=r.revision,
            node_id=self.node_id,
        )
        if r.error is not None:
            resp.error.CopyFrom(self.err(r.error))
        if not r.events:
            return resp
        shared = self._shared
        if shared is None or shared[0] is not r.events:
            template = kv_pb2.WatchResponse()
            self._add_events(template, r.events)
            shared = self._shared = (r.events, template)
        resp.MergeFrom(shared[1])
        if self.plant:
            self._plant_bug(resp)
        return resp

    def _plant_bug(self, resp: kv_pb2.WatchResponse) -> None:
        """The planted bug (`watch_service.PLANT_ENV`)."""
        self._planted += 1
        if self._planted % self.plant_every:
            return
        if self.plant == "drop":
            del resp.events[-1]
        elif self.plant == "repeat":
            resp.events.add().CopyFrom(resp.events[0])

    def _add_events(self, resp: kv_pb2.WatchResponse, events: list[Change]) -> None:
        add = resp.events.add
        for c in events:
            if c.kind == PUT:
                ev = add(type=kv_pb2.Event.PUT)
                ev.kv.key, ev.kv.value = c.key, c.value or b""
                ev.kv.create_revision, ev.kv.mod_revision, ev.kv.version = c.create_revision, c.revision, c.version
            else:
                ev = add(type=kv_pb2.Event.DELETE)
                ev.kv.key, ev.kv.mod_revision = c.key, c.revision
            p = c.prev
            if p is not None and p.value is not None:
                pk = ev.prev_kv
                pk.key, pk.value = c.key, p.value
                pk.create_revision, pk.mod_revision, pk.version = (
                    p.meta.create_revision, p.meta.mod_revision, p.meta.version)


__all__ = ["ENCODED_KEEP", "WatchEncoder"]
