"""kvstore's errors as etcd's gRPC statuses. etcd clients match some errors by their message
(clientv3's `rpctypes`), so those keep etcd's exact text; every error also carries the trailing
metadata `kvstore-outcome`: `definite` (it did not happen) or `indeterminate` (it may have), as
kvstore's own replies say in `Error.indeterminate`."""

from __future__ import annotations

from typing import TypeVar

import grpc

from kvstore import errors
from kvstore.v1 import kv_pb2

from .convert import EtcdRequestError

COMPACTED = "etcdserver: mvcc: required revision has been compacted"
FUTURE_REV = "etcdserver: mvcc: required revision is a future revision"
LEASE_NOT_FOUND = "etcdserver: requested lease not found"
KEY_NOT_FOUND = "etcdserver: key not found"
NO_SPACE = "etcdserver: mvcc: database space exceeded"
TIMEOUT = "etcdserver: request timed out"
NO_LEADER = "etcdserver: no leader"
NOT_LEADER = "etcdserver: not leader"
LEADER_CHANGED = "etcdserver: leader changed"
TOO_MANY_REQUESTS = "etcdserver: too many requests"
REQUEST_TOO_LARGE = "etcdserver: request is too large"
PERMISSION_DENIED = "etcdserver: permission denied"
INVALID_TOKEN = "etcdserver: invalid auth token"
LEASE_EXISTS = "etcdserver: lease already exists"

OUTCOME_KEY = "kvstore-outcome"

_R = TypeVar("_R")


class EtcdStatus(Exception):
    """An etcd call's failure: the gRPC `code`, etcd's `message`, and whether the operation may
    have happened (`indeterminate`)."""

    def __init__(self, code: grpc.StatusCode, message: str, indeterminate: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.indeterminate = indeterminate

    async def abort(self, context: grpc.aio.ServicerContext) -> None:
        context.set_trailing_metadata(((OUTCOME_KEY, "indeterminate" if self.indeterminate else "definite"),))
        await context.abort(self.code, self.message)


def _with(base: str, detail: str) -> str:
    return f"{base} ({detail})" if detail and detail != base else base


def of_kv_error(err: errors.KVError) -> EtcdStatus:
    """The etcd status of a kvstore error."""
    c = grpc.StatusCode
    ind = err.indeterminate
    if isinstance(err, errors.Compacted):
        return EtcdStatus(c.OUT_OF_RANGE, COMPACTED)
    if isinstance(err, errors.Timeout):
        return EtcdStatus(c.UNAVAILABLE, TIMEOUT if ind else _with(TIMEOUT, "nothing was applied"), ind)
    if isinstance(err, errors.LeadershipLost):
        return EtcdStatus(c.UNAVAILABLE, LEADER_CHANGED, ind)
    if isinstance(err, errors.NoLeader):
        return EtcdStatus(c.UNAVAILABLE, NO_LEADER, ind)
    if isinstance(err, errors.NotLeader):
        return EtcdStatus(c.UNAVAILABLE, _with(NOT_LEADER, err.message), ind)
    if isinstance(err, errors.NoSpace):
        return EtcdStatus(c.RESOURCE_EXHAUSTED, NO_SPACE, ind)
    if isinstance(err, errors.ResourceExhausted):
        return EtcdStatus(c.RESOURCE_EXHAUSTED, TOO_MANY_REQUESTS, ind)
    if isinstance(err, errors.RequestTooLarge):
        return EtcdStatus(c.INVALID_ARGUMENT, REQUEST_TOO_LARGE, ind)
    if isinstance(err, errors.PermissionDenied):
        return EtcdStatus(c.PERMISSION_DENIED, PERMISSION_DENIED, ind)
    if isinstance(err, errors.Unauthenticated):
        return EtcdStatus(c.UNAUTHENTICATED, INVALID_TOKEN, ind)
    if isinstance(err, errors.FutureRevision):
        # a read at a revision kvstore cannot have yet (README "Revisions")
        return EtcdStatus(c.OUT_OF_RANGE, FUTURE_REV, ind)
    if isinstance(err, errors.LeaseNotFound):
        return EtcdStatus(c.NOT_FOUND, LEASE_NOT_FOUND, ind)
    if isinstance(err, errors.LeaseExists):
        return EtcdStatus(c.FAILED_PRECONDITION, LEASE_EXISTS, ind)
    if isinstance(err, errors.InvalidArgument | errors.KeyTooLarge | errors.ValueTooLarge):
        return EtcdStatus(c.INVALID_ARGUMENT, f"etcdserver: {err.message}", ind)
    if isinstance(err, errors.WrongShard | errors.StaleReplica | errors.ShuttingDown | errors.Unavailable
                  | errors.ProposalDropped | errors.StorageFull):
        return EtcdStatus(c.UNAVAILABLE, f"kvstore: {err.message}", ind)
    return EtcdStatus(c.INTERNAL if isinstance(err, errors.InternalError) else c.UNKNOWN, f"kvstore: {err.message}", ind)


def check_reply(error: kv_pb2.Error, *, is_write: bool) -> None:
    """Raise the EtcdStatus of a kvstore reply's `error` (nothing if it is OK)."""
    err = errors.from_proto(error, is_write=is_write)
    if err is not None:
        raise of_kv_error(err)


def checked(resp: _R, *, is_write: bool) -> _R:
    """`resp`, a kvstore reply with an `error` field (an Admin or Auth call's), once
    `check_reply` found it OK."""
    check_reply(resp.error, is_write=is_write)  # type: ignore[attr-defined]
    return resp


def of_request_error(err: EtcdRequestError) -> EtcdStatus:
    return EtcdStatus(getattr(grpc.StatusCode, err.code), err.message)
