"""`kvctl txn`'s input parser (etcdctl's format): the documented forms, refusals naming the bad
line, and totality on any text (TxnSyntaxError, never another exception)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.cli.txnparse import TxnSyntaxError, parse_txn
from kvstore.client.types import Compare, Op


def enc(s: str) -> bytes:
    return s.encode()


def test_the_etcdctl_format() -> None:
    text = (
        'value("k") = "v"\nversion("k") > "3"\ncreate("new") = "0"\nmod("k") < "10"\nval("q\\"x") != "a\\nb"\n'
        'ver("k") != "1"\nc("k") > "0"\nm("k") = "5"\n'
        "\n"
        "put k v1\nput \"two words\" 'a b'\nget k\n"
        "\n"
        "del k\ndelete j\n"
    )
    p = parse_txn(text, enc)
    assert p.compares == (
        Compare.value(b"k", "=", b"v"), Compare.version(b"k", ">", 3), Compare.create(b"new", "=", 0),
        Compare.mod(b"k", "<", 10), Compare.value(b'q"x', "!=", b"a\nb"), Compare.version(b"k", "!=", 1),
        Compare.create(b"k", ">", 0), Compare.mod(b"k", "=", 5),
    )
    assert p.success == (Op.put(b"k", b"v1"), Op.put(b"two words", b"a b"), Op.get(b"k"))
    assert p.failure == (Op.delete(b"k"), Op.delete(b"j"))
    # no compares (a leading blank line): the success ops always run
    p = parse_txn("\nput a 1\n", enc)
    assert p.compares == () and p.success == (Op.put(b"a", b"1"),) and p.failure == ()
    # trailing blank lines end the input; etcdctl ignores anything after them, here it is refused
    # (a stray blank line inside the failure ops would otherwise drop the rest silently)
    assert parse_txn("\n\nget a\n\n\n", enc).failure == (Op.get(b"a"),)
    with pytest.raises(TxnSyntaxError, match="after the failure operations"):
        parse_txn("\n\nget a\n\nput b 2\n", enc)


@pytest.mark.parametrize(("text", "msg"), [
    ('value("k")="v"\n', "malformed comparison"),
    ('lease("k") = "zz"\n', "lease needs a hexadecimal id"),
    ('lease("k") = "8000000000000000"\n', "lease needs a hexadecimal id"),
    ('lease("k") = ""\n', "lease needs a hexadecimal id"),
    ('value("k") == "v"\n', "unknown operator =="),
    ('version("k") > "-1"\n', "needs a number"),
    ('mod("k") < "x"\n', "needs a number"),
    ('version("k") > "9223372036854775808"\n', "needs a number"),
    ('version("k") > "' + "9" * 5000 + '"\n', "needs a number"),  # past int()'s digit limit: still named
    ("\nput k\n", "put takes KEY VALUE"),
    ("\nput k v --prev-kv\n", "not supported"),
    ("\nput k v --lease=zz\n", "bad lease id"),
    ("\nput k v --lease=8000000000000000\n", "bad lease id"),
    ("\nput k v --lease\n", "needs an ID"),
    ("\nput k v --lease=1 --lease=2\n", "twice"),
    ("\nget k --lease=1\n", "not supported"),
    ("\nget --rev 3 k\n", "not supported"),
    ("\ndel --prev-kv k\n", "not supported"),
    ("\nget\n", "needs one argument"),
    ("\nget --prefix a b\n", "too many arguments"),
    ("\nget a b c\n", "too many arguments"),
    ("\nget --prefix --from-key a\n", "cannot be set at the same time"),
    ("\nget --limit -1 a b\n", "--limit needs a number"),
    ("\nget a b --limit\n", "--limit needs a number"),
    ("\nget a ''\n", "RANGE_END must not be empty"),
    ("\nrange k\n", "unknown operation"),
    ('\nput "k v\n', "malformed operation"),
    ('value("k\\q") = "v"\n', "malformed quoted string"),
])
def test_refusals_name_the_line(text: str, msg: str) -> None:
    with pytest.raises(TxnSyntaxError, match=msg):
        parse_txn(text, enc)


def test_a_lease_compare_takes_a_hex_id() -> None:
    p = parse_txn('lease("k") = "694d81a4b2c3"\nlease("j") != "0"\n\nput k v\n', enc)
    assert p.compares == (Compare.lease(b"k", "=", 0x694D81A4B2C3), Compare.lease(b"j", "!=", 0))


def test_a_puts_lease_is_etcdctls_hex_flag() -> None:
    p = parse_txn("\nput k v --lease=694d81a4b2c3\nput --lease 1f j w\nput a b --lease=0\n", enc)
    assert p.success == (Op.put(b"k", b"v", lease=0x694D81A4B2C3), Op.put(b"j", b"w", lease=0x1F), Op.put(b"a", b"b"))


def test_gets_range_forms_are_scans() -> None:
    """etcdctl's get of a range (get_command.go's getGetOp): KEY RANGE_END, --prefix KEY,
    --from-key KEY (flags before or after the key, as cobra takes them), --limit N or =N; a get
    of one key (with or without --limit) stays a get."""
    p = parse_txn("\nget a b\nget --prefix p/\nget p/ --prefix --limit 2\nget --from-key m --limit=3\n"
                  "get --prefix ''\nget --limit 5 k\nget -- --odd\n", enc)
    assert p.success == (
        Op.scan(b"a", b"b"), Op.scan(prefix=b"p/"), Op.scan(prefix=b"p/", limit=2), Op.scan(b"m", limit=3),
        Op.scan(prefix=b""), Op.get(b"k"), Op.get(b"--odd"),
    )


def test_an_encoder_refusal_is_a_syntax_error() -> None:
    def hexenc(s: str) -> bytes:
        return bytes.fromhex(s)

    assert parse_txn("\nput 6b 76\n", hexenc).success == (Op.put(b"k", b"v"),)
    with pytest.raises(TxnSyntaxError):
        parse_txn("\nput zz 76\n", hexenc)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from('valuesrinoc()"= !<>0123456789\\\n\'-kpdgtfxym '), max_size=80))
def test_parse_is_total(text: str) -> None:
    with contextlib.suppress(TxnSyntaxError):
        parse_txn(text, enc)
