from kvstore.v1 import kv_pb2 as _kv_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AlarmType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALARM_NONE: _ClassVar[AlarmType]
    ALARM_NOSPACE: _ClassVar[AlarmType]
ALARM_NONE: AlarmType
ALARM_NOSPACE: AlarmType

class Member(_message.Message):
    __slots__ = ("id", "address", "learner", "client_address")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LEARNER_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    id: int
    address: str
    learner: bool
    client_address: str
    def __init__(self, id: _Optional[int] = ..., address: _Optional[str] = ..., learner: _Optional[bool] = ..., client_address: _Optional[str] = ...) -> None: ...

class GroupStatus(_message.Message):
    __slots__ = ("group", "role", "term", "leader_id", "commit", "applied", "last_index", "first_index", "voters", "learners", "progress", "staleness_ms", "leader_contact_ms", "sessions", "sessions_evicted")
    class Progress(_message.Message):
        __slots__ = ("id", "match", "next", "state")
        ID_FIELD_NUMBER: _ClassVar[int]
        MATCH_FIELD_NUMBER: _ClassVar[int]
        NEXT_FIELD_NUMBER: _ClassVar[int]
        STATE_FIELD_NUMBER: _ClassVar[int]
        id: int
        match: int
        next: int
        state: str
        def __init__(self, id: _Optional[int] = ..., match: _Optional[int] = ..., next: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...
    GROUP_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    LAST_INDEX_FIELD_NUMBER: _ClassVar[int]
    FIRST_INDEX_FIELD_NUMBER: _ClassVar[int]
    VOTERS_FIELD_NUMBER: _ClassVar[int]
    LEARNERS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_MS_FIELD_NUMBER: _ClassVar[int]
    LEADER_CONTACT_MS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_EVICTED_FIELD_NUMBER: _ClassVar[int]
    group: int
    role: str
    term: int
    leader_id: int
    commit: int
    applied: int
    last_index: int
    first_index: int
    voters: _containers.RepeatedScalarFieldContainer[int]
    learners: _containers.RepeatedScalarFieldContainer[int]
    progress: _containers.RepeatedCompositeFieldContainer[GroupStatus.Progress]
    staleness_ms: int
    leader_contact_ms: int
    sessions: int
    sessions_evicted: int
    def __init__(self, group: _Optional[int] = ..., role: _Optional[str] = ..., term: _Optional[int] = ..., leader_id: _Optional[int] = ..., commit: _Optional[int] = ..., applied: _Optional[int] = ..., last_index: _Optional[int] = ..., first_index: _Optional[int] = ..., voters: _Optional[_Iterable[int]] = ..., learners: _Optional[_Iterable[int]] = ..., progress: _Optional[_Iterable[_Union[GroupStatus.Progress, _Mapping]]] = ..., staleness_ms: _Optional[int] = ..., leader_contact_ms: _Optional[int] = ..., sessions: _Optional[int] = ..., sessions_evicted: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("node_id", "cluster_id", "address", "members", "groups", "storage_full", "client_address", "cluster_version", "supported_level", "member_levels")
    class MemberLevelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FULL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_LEVEL_FIELD_NUMBER: _ClassVar[int]
    MEMBER_LEVELS_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    cluster_id: str
    address: str
    members: _containers.RepeatedCompositeFieldContainer[Member]
    groups: _containers.RepeatedCompositeFieldContainer[GroupStatus]
    storage_full: bool
    client_address: str
    cluster_version: int
    supported_level: int
    member_levels: _containers.ScalarMap[int, int]
    def __init__(self, node_id: _Optional[int] = ..., cluster_id: _Optional[str] = ..., address: _Optional[str] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[GroupStatus, _Mapping]]] = ..., storage_full: _Optional[bool] = ..., client_address: _Optional[str] = ..., cluster_version: _Optional[int] = ..., supported_level: _Optional[int] = ..., member_levels: _Optional[_Mapping[int, int]] = ...) -> None: ...

class AddMemberRequest(_message.Message):
    __slots__ = ("id", "address", "learner", "groups")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LEARNER_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    id: int
    address: str
    learner: bool
    groups: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, id: _Optional[int] = ..., address: _Optional[str] = ..., learner: _Optional[bool] = ..., groups: _Optional[_Iterable[int]] = ...) -> None: ...

class PromoteMemberRequest(_message.Message):
    __slots__ = ("id", "groups")
    ID_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    id: int
    groups: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, id: _Optional[int] = ..., groups: _Optional[_Iterable[int]] = ...) -> None: ...

class RemoveMemberRequest(_message.Message):
    __slots__ = ("id", "groups")
    ID_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    id: int
    groups: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, id: _Optional[int] = ..., groups: _Optional[_Iterable[int]] = ...) -> None: ...

class TransferLeaderRequest(_message.Message):
    __slots__ = ("to", "groups")
    TO_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    to: int
    groups: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, to: _Optional[int] = ..., groups: _Optional[_Iterable[int]] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdminResponse(_message.Message):
    __slots__ = ("error", "message", "members")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    error: _kv_pb2.Error
    message: str
    members: _containers.RepeatedCompositeFieldContainer[Member]
    def __init__(self, error: _Optional[_Union[_kv_pb2.Error, _Mapping]] = ..., message: _Optional[str] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ...) -> None: ...

class Alarm(_message.Message):
    __slots__ = ("node_id", "type")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    type: AlarmType
    def __init__(self, node_id: _Optional[int] = ..., type: _Optional[_Union[AlarmType, str]] = ...) -> None: ...

class AlarmListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AlarmDisarmRequest(_message.Message):
    __slots__ = ("node_id", "type")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    type: AlarmType
    def __init__(self, node_id: _Optional[int] = ..., type: _Optional[_Union[AlarmType, str]] = ...) -> None: ...

class AlarmResponse(_message.Message):
    __slots__ = ("error", "alarms")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ALARMS_FIELD_NUMBER: _ClassVar[int]
    error: _kv_pb2.Error
    alarms: _containers.RepeatedCompositeFieldContainer[Alarm]
    def __init__(self, error: _Optional[_Union[_kv_pb2.Error, _Mapping]] = ..., alarms: _Optional[_Iterable[_Union[Alarm, _Mapping]]] = ...) -> None: ...

class HashKVRequest(_message.Message):
    __slots__ = ("group", "revision", "exact")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    EXACT_FIELD_NUMBER: _ClassVar[int]
    group: int
    revision: int
    exact: bool
    def __init__(self, group: _Optional[int] = ..., revision: _Optional[int] = ..., exact: _Optional[bool] = ...) -> None: ...

class HashKVResponse(_message.Message):
    __slots__ = ("error", "node_id", "group", "revision", "hash", "keys", "applied", "compact_revision")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    COMPACT_REVISION_FIELD_NUMBER: _ClassVar[int]
    error: _kv_pb2.Error
    node_id: int
    group: int
    revision: int
    hash: bytes
    keys: int
    applied: int
    compact_revision: int
    def __init__(self, error: _Optional[_Union[_kv_pb2.Error, _Mapping]] = ..., node_id: _Optional[int] = ..., group: _Optional[int] = ..., revision: _Optional[int] = ..., hash: _Optional[bytes] = ..., keys: _Optional[int] = ..., applied: _Optional[int] = ..., compact_revision: _Optional[int] = ...) -> None: ...
