#!/usr/bin/env python3
"""Seeds the fuzz corpora from resp-tests/cases/*.case.

corpus/request/<case>: what the case sends (all `send` and `more` lines, in order);
corpus/reply/<case>:   what the ambassador answers (the `expect` lines), with each `{*}`
                       wildcard replaced by plausible bytes of the right shape.

Each seed is the fuzz input layout of fuzz_targets/plan.rs: a header byte, then the bytes.
Header 0x00 delivers them in one read; a second seed per case with header 0x08 also delivers
them one byte per read. Request seeds get a third variant that authenticates first with the
password the `request` target accepts (`pw`), so the password-required run gets past AUTH.

Usage: fuzz/seed.py (from anywhere; paths are relative to this file).
"""

import pathlib
import re

FUZZ = pathlib.Path(__file__).resolve().parent
CASES = FUZZ.parent / "resp-tests" / "cases"
ESCAPES = {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\"}
AUTH_PW = b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n"


def unescape(text: str) -> bytes:
    """The case format's escapes: \\r \\n \\t \\\\ and \\xHH; everything else literal."""
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out += c.encode()
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "x":
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:
            out += ESCAPES[nxt]
            i += 2
    return bytes(out)


# Wildcards in context, most specific first (see `grep '{\*}' resp-tests/cases/*.case`).
WILDCARDS = [
    (rb"\$\{\*\}\r\n\{\*\}\r\n", b"$5\r\n7.2.4\r\n"),  # HELLO's version
    (rb"\+FULLRESYNC \{\*\} \{n\}", b"+FULLRESYNC 0123456789abcdef0123456789abcdef01234567 0"),
    (rb"\{rdb\}", b"$20\r\nREDIS0011\xfa\x09redis-ver"),  # an RDB's start
    (rb"\{n\}", b"42"),  # a client id, an offset
    (rb"\{\*\}", b"x"),
]


def fill_wildcards(pattern: bytes) -> bytes:
    for wildcard, plausible in WILDCARDS:
        pattern = re.sub(wildcard, lambda _m, p=plausible: p, pattern)
    return pattern


def read_case(path: pathlib.Path):
    sends, expect = [], b""
    for line in path.read_text().splitlines():
        word, _, rest = line.partition(" ")
        if word == "send":
            sends.append(unescape(rest))
        elif word == "more":
            sends[-1] += unescape(rest)
        elif word == "expect":
            expect += unescape(rest)
    return b"".join(sends), fill_wildcards(expect)


# Hand-written request seeds near the framer's limits, in the expanded form of plan.rs
# (header bit 0x10: `\xfe c b` is (c + 1) * 512 copies of b), cut once at offset 100.
CUT_100 = bytes([100, 0, 0])
LIMIT_SEEDS = {
    # An AUTH (held whole for the filter) longer than INSPECT_MAX.
    "limit-auth-over-inspect-max": b"*2\r\n$4\r\nAUTH\r\n$70144\r\n\xfe\x88a\r\n",
    # A HELLO held whole just under INSPECT_MAX, then a PING.
    "limit-hello-under-inspect-max": b"*3\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$65024\r\n\xfe\x7ex\r\n"
    b"*1\r\n$4\r\nPING\r\n",
    # An inline line longer than INLINE_MAX.
    "limit-inline-over-max": b"\xfe\x80a\r\n",
    # A count line longer than INLINE_MAX.
    "limit-count-line-over-max": b"*\xfe\x801\r\n",
    # A bulk over the unauthenticated limit (16 KiB), after a wrong password.
    "limit-unauth-bulk": b"AUTH nope\r\n*2\r\n$3\r\nGET\r\n$16896\r\n\xfe\x20b\r\n",
    # A streamed SET whose value is larger than INSPECT_MAX.
    "limit-streamed-set": b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$70144\r\n\xfe\x88v\r\n"
    b"*1\r\n$4\r\nPING\r\n",
}


def main():
    request = FUZZ / "corpus" / "request"
    reply = FUZZ / "corpus" / "reply"
    request.mkdir(parents=True, exist_ok=True)
    reply.mkdir(parents=True, exist_ok=True)
    count = 0
    for path in sorted(CASES.glob("*.case")):
        sent, expected = read_case(path)
        name = path.stem
        for header, suffix in [(b"\x00", ""), (b"\x08", "-bytewise")]:
            (request / f"{name}{suffix}").write_bytes(header + sent)
            if expected:
                (reply / f"{name}{suffix}").write_bytes(header + expected)
        (request / f"{name}-after-auth").write_bytes(b"\x00" + AUTH_PW + sent)
        count += 1
    for name, sent in LIMIT_SEEDS.items():
        (request / name).write_bytes(b"\x11" + CUT_100 + sent)
    print(f"seeded {count} cases and {len(LIMIT_SEEDS)} limit seeds into {request} and {reply}")


if __name__ == "__main__":
    main()
