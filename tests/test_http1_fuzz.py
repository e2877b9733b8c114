"""Differential fuzzing of the upstream client's response parser against h11 (issue 14).

Hypothesis writes upstream responses, valid and broken: Content-Length, chunked and
close-delimited bodies, chunk sizes in either hex case with leading zeros and
extensions, bad chunk lines, trailers, interim 1xx heads, odd header lines (obs-fold,
a space before the colon, control characters, bare LF), repeated or malformed
Content-Length, odd Transfer-Encoding, bad status lines, truncation, bytes after the
end. A loopback server sends each one split at drawn byte boundaries, giving the event
loop a drawn number of turns between pieces so the client parses them in different
reads (ordering only, no sleeps); h11 parses the same bytes.

What h11 accepts, the client must read alike: the same status, the same headers as the
client exposes them (minus what it strips on purpose, see `exposed`), the same body.
What h11 refuses, the client must refuse with an `UpstreamError`. It must never hang:
each exchange has a deadline well below the client's read timeout, and a read timeout
counts as a hang.

Where the client differs from h11 on purpose, the generator tags the case with a reason
from STRICTER (the client refuses what h11 takes) or LENIENT (the client takes what h11
refuses; h11 then reads the same response with that one oddity put right, and the
client must read the original as h11 reads that).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import h11
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proxy.errors import UpstreamError, UpstreamTimeout
from proxy.upstream.http1 import Http1Transport
from proxy.upstream.transport import Headers

FUZZ = settings(
    max_examples=600,  # about 5 s on one core; 6000 also pass, in about a minute
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HANG_S = 5.0
"""Longest an exchange may take; every generated answer ends or is refused at once."""

STRICTER = {
    "status 600-999": "SPEC section 11: a status outside 100-599 is a 502; h11 takes up to 999",
    "HTTP/1.2": "llhttp knows HTTP/1.0 and 1.1 (and 0.9, 2.0); h11 takes any digit.digit",
    "bare LF": "llhttp wants CRLF after a header line; RFC 9112 section 2.2 only allows "
    "(MAY) a bare LF, which h11 takes",
    "obs-fold": "RFC 9112 section 5.2 lets a proxy answer 502 to a folded line; h11 unfolds",
    "control char": "llhttp refuses control characters in a field value (RFC 9110 section "
    "5.5 has none); h11 takes all but NUL and whitespace",
    "interim length": "a 1xx has no body (RFC 9110 section 15.2) but llhttp would read one "
    "for a 1xx other than 100, 102, 103 with a length, so any 1xx with a length is refused; "
    "h11 ignores the length",
    "repeated length": "llhttp refuses a repeated Content-Length even with equal values, "
    "which RFC 9110 section 8.6 allows; h11 merges equal ones",
    "chunk line": "llhttp refuses whitespace in a chunk line and an extension without a "
    "name; h11 skips all after `;`, and whitespace before the CRLF",
}
LENIENT = {
    "coded": "RFC 9112 section 6.3: with chunked the last transfer coding the body is "
    "chunked, without chunked it ends at the close; h11 takes chunked alone",
    "leading CRLF": "llhttp skips empty lines before a status line, as RFC 9112 section 2.2 "
    "asks of a server before a request line; h11 refuses them",
    "NUL in reason": "the reason phrase never leaves the client, which ignores it; h11 "
    "refuses a NUL in it",
}

CRLF = b"\r\n"
TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection"})
NAMES = [
    b"Content-Type",
    b"x-request-id",
    b"Set-Cookie",
    b"set-cookie",
    b"X-Foo",
    b"x-bar",
    b"Keep-Alive",
    b"openai-processing-ms",
]
VALUE_BYTES = [*range(0x21, 0x7F), 0x20, 0x09, 0x80, 0xE9, 0xFF]


# --- what each side makes of the bytes -----------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    status: int
    headers: Headers
    body: bytes


@dataclass(frozen=True)
class Refused:
    reason: str
    timed_out: bool = False


Outcome = Accepted | Refused


def h11_reads(method: str, wire: bytes, *, eof: bool) -> Outcome | None:
    """h11's reading of `wire` as the answer to `method`, the connection closed after it
    when `eof`; None while it needs more bytes."""
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method=method, target="/", headers=[("Host", "fuzz")]))
    connection.send(h11.EndOfMessage())
    connection.receive_data(wire)
    if eof:
        connection.receive_data(b"")
    head: h11.Response | None = None
    body: list[bytes] = []
    try:
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return Accepted(head.status_code, head.headers.raw_items(), b"".join(body))
            elif not isinstance(event, h11.InformationalResponse):
                return Refused(f"h11: {event!r} before the end")  # ConnectionClosed
    except h11.RemoteProtocolError as error:
        return Refused(f"h11: {error}")


def exposed(outcome: Accepted) -> Accepted:
    """h11's reading as the client exposes it: without the fields the Connection header
    names (RFC 9110 section 7.6.1) and without a Content-Length that describes no
    relayed body (beside a Transfer-Encoding, or on a 204 or 304)."""
    headers = outcome.headers
    names = {name.lower() for name, _ in headers}
    drop = {
        option.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for option in value.split(b",")
    }
    if b"content-length" in names and (
        b"transfer-encoding" in names or outcome.status in (204, 304)
    ):
        drop.add(b"content-length")
    kept = [(name, value) for name, value in headers if name.lower() not in drop]
    return Accepted(outcome.status, kept, outcome.body)


def compared(outcome: Accepted, *, drop_coding: bool) -> Accepted:
    """Transfer-Encoding values compare without case (h11 lower-cases them); with
    `drop_coding`, not at all: the client exposes the codings the upstream sent, h11
    read its put-right form (the relay drops the header either way)."""
    kept = [
        (name, value.lower() if name.lower() == b"transfer-encoding" else value)
        for name, value in outcome.headers
        if not (drop_coding and name.lower() == b"transfer-encoding")
    ]
    return Accepted(outcome.status, kept, outcome.body)


# --- the upstream ------------------------------------------------------------------------------


class Upstream:
    """A loopback server that answers the one request of each exchange with the pieces
    it was given, yielding the given number of event-loop turns after each, then closes
    or (`keep_open`) waits for the client to close."""

    def __init__(self) -> None:
        self.pieces: list[tuple[bytes, int]] = []
        self.keep_open = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def finished(self) -> None:
        """Until every connection's handler has ended."""
        await asyncio.gather(*self._handlers)

    def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._send(reader, writer, self.pieces, self.keep_open))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _send(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pieces: list[tuple[bytes, int]],
        keep_open: bool,
    ) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")  # GET, HEAD, or POST with no body
            for piece, turns in pieces:
                writer.write(piece)
                await writer.drain()
                for _ in range(turns):
                    await asyncio.sleep(0)
            if keep_open:
                await reader.read()  # until the client closes
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client refused the answer and closed
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def client_reads(upstream: Upstream, case: Case, keep_open: bool) -> Outcome:
    """The client's reading of `case` over a fresh transport: Accepted or Refused; a
    TimeoutError if it takes longer than HANG_S."""
    upstream.pieces, upstream.keep_open = case.pieces, keep_open
    transport = Http1Transport(connect_timeout_s=2, read_timeout_s=3 * HANG_S, provider_id="fuzz")
    try:
        async with asyncio.timeout(HANG_S):
            try:
                response = await transport.send(
                    case.method, f"http://127.0.0.1:{upstream.port}/", [], b""
                )
            except UpstreamError as error:
                return Refused(error.message, isinstance(error, UpstreamTimeout))
            try:
                body = await response.read()
            except UpstreamError as error:
                return Refused(error.message, isinstance(error, UpstreamTimeout))
            finally:
                await response.aclose()
            return Accepted(response.status, response.raw_headers, body)
    finally:
        await transport.close()
        async with asyncio.timeout(HANG_S):
            await upstream.finished()


@pytest.fixture(scope="module")
def upstream_loop() -> Iterator[tuple[asyncio.Runner, Upstream]]:
    """One event loop and one upstream for every example: a loop per example would
    cost more than the exchange."""
    with asyncio.Runner() as runner:
        upstream = Upstream()
        runner.run(upstream.start())
        yield runner, upstream
        runner.run(upstream.stop())


# --- the responses -----------------------------------------------------------------------------


@dataclass
class Case:
    method: str
    wire: bytes
    canonical: bytes
    """`wire` with each LENIENT oddity put right (the same bytes when there is none)."""
    pieces: list[tuple[bytes, int]] = field(repr=False)
    stricter: list[str]
    lenient: list[str]


def rarely(draw: st.DrawFn, one_in: int) -> bool:
    """True once in `one_in` draws; shrinks to False, so failing cases shrink to the
    fewest oddities."""
    return draw(st.integers(0, one_in - 1)) == one_in - 1


names = st.one_of(
    st.sampled_from(NAMES),
    st.text(TCHARS, min_size=1, max_size=12)
    .map(str.encode)
    .filter(lambda name: name.lower() not in FRAMING),
)
values = st.lists(st.sampled_from(VALUE_BYTES), max_size=16).map(bytes)
ows = st.sampled_from([b" ", b" ", b"", b"  ", b"\t"])


def header_line(draw: st.DrawFn, name: bytes, value: bytes, stricter: list[str]) -> bytes:
    """`name: value` CRLF with drawn whitespace, sometimes made odd."""
    odd = None
    if rarely(draw, 40):
        odd = draw(
            st.sampled_from(
                ["obs-fold", "control char", "bare LF", "nul", "space before colon", "no colon"]
            )
        )
    separator = b":"
    if odd == "control char":
        value += b"a" + draw(st.sampled_from([b"\x01", b"\x08", b"\x1f", b"\x7f"])) + b"b"
    elif odd == "nul":
        value += b"a\x00b"  # both refuse: h11 and llhttp
    elif odd == "space before colon":
        separator = b" :"  # both refuse
    elif odd == "no colon":
        separator = b" "  # both refuse
    line = name + separator + draw(ows) + value + draw(st.sampled_from([b"", b"", b" ", b"\t"]))
    if odd == "obs-fold":
        line += CRLF + draw(st.sampled_from([b" ", b"\t"])) + b"folded"
    if odd in ("obs-fold", "control char", "bare LF"):
        stricter.append(odd)
    return line + (b"\n" if odd == "bare LF" else CRLF)


def chunk_line(draw: st.DrawFn, size: int, stricter: list[str]) -> bytes:
    """A chunk-size line: hex in either case, leading zeros, maybe extensions."""
    digits = b"%x" % size
    if draw(st.booleans()):
        digits = digits.upper()
    digits = b"0" * draw(st.integers(0, 2)) + digits
    extension = b""
    if rarely(draw, 4):
        extension = draw(st.sampled_from([b";a", b";a=b", b';a="b c"', b";a=b;c", b";=b"]))
    if rarely(draw, 40):
        extension = draw(st.sampled_from([b";", b"; a", b";a= b"]))
    space = b" " if rarely(draw, 40) else b""
    if extension in (b";", b"; a", b";a= b") or space:
        stricter.append("chunk line")
    return digits + extension + space + CRLF


def chunked(draw: st.DrawFn, body: bytes, stricter: list[str]) -> bytes:
    """`body` chunked, sometimes broken, with a last chunk and maybe trailers."""
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(body) - 1)), max_size=3)))
    sizes = [b - a for a, b in itertools.pairwise([0, *cuts, len(body)]) if b > a]
    wire, offset = b"", 0
    for size in sizes:
        data = body[offset : offset + size]
        offset += size
        broken = None
        if rarely(draw, 40):
            broken = draw(st.sampled_from(["bad size", "wrong size", "no CRLF"]))
        if broken == "bad size":
            wire += draw(st.sampled_from([b"zz", b"-1", b"", b"0x3"])) + CRLF + data + CRLF
        elif broken == "wrong size":
            wire += chunk_line(draw, size + draw(st.sampled_from([-1, 1, 2])), []) + data + CRLF
        else:
            wire += chunk_line(draw, size, stricter) + data + (b"" if broken else CRLF)
    wire += chunk_line(draw, 0, stricter)
    for _ in range(draw(st.integers(0, 2))):
        if rarely(draw, 30):
            wire += b"bad trailer" + CRLF  # no colon: both refuse
        else:
            wire += header_line(draw, draw(names), draw(values), stricter)
    return wire + CRLF


@st.composite
def responses(draw: st.DrawFn) -> Case:
    stricter: list[str] = []
    lenient: list[str] = []
    method = draw(st.sampled_from(["GET", "GET", "POST", "HEAD"]))
    version = draw(st.sampled_from([b"1.1"] * 6 + [b"1.0"]))
    if rarely(draw, 30):
        version = b"1.2"
    if version == b"1.2":
        stricter.append("HTTP/1.2")

    leading_crlf = rarely(draw, 30)
    if leading_crlf:
        lenient.append("leading CRLF")

    interim = b""
    for _ in range(draw(st.sampled_from([0] * 6 + [1, 2]))):
        code = draw(st.sampled_from([100, 102, 103, 150, 199, 101]))
        interim += b"HTTP/%s %d Interim\r\n" % (version, code)
        if draw(st.booleans()):
            interim += b"link: </s.css>; rel=preload\r\n"
        if rarely(draw, 12):
            interim += draw(
                st.sampled_from([b"content-length: 0\r\n", b"transfer-encoding: chunked\r\n"])
            )
            stricter.append("interim length")
        interim += CRLF

    status = draw(st.sampled_from([200] * 8 + [201, 204, 206, 304, 400, 404, 429, 500, 503]))
    if rarely(draw, 16):
        status = draw(st.sampled_from([0, 99, 101, 600, 999]))
    if status >= 600:
        stricter.append("status 600-999")
    token = b"%03d" % status
    if rarely(draw, 30):
        token = draw(st.sampled_from([b"2x0", b"20", b"2000", b"-20", b"20 0"]))  # both refuse
    reason = draw(
        st.sampled_from(
            [b" OK"] * 6 + [b"", b" ", b" Not Found", b" \xe9t\xe9", b" a\tb", b" \x01"]
        )
    )
    if rarely(draw, 30):
        reason = draw(st.sampled_from([b" O\x00K", b" O\rK"]))
    if b"\x00" in reason:
        lenient.append("NUL in reason")

    body = draw(st.binary(max_size=40))
    bodiless = method == "HEAD" or status in (204, 304) or status < 200
    framing = draw(st.sampled_from(["length"] * 4 + ["chunked"] * 4 + ["close"] * 2 + ["both"]))
    if rarely(draw, 6):
        framing = draw(st.sampled_from(["coded", "bad coding"]))
    # The framing fields as sent, and as h11 would take them (for "coded").
    fields: list[bytes] = []
    canonical_fields: list[bytes] | None = None
    payload = b""
    tail = b""
    if framing == "length":
        length = b"%d" % len(body)
        kind = "exact"
        if rarely(draw, 4):
            kind = draw(st.sampled_from(["spaces", "zeros", "short", "long"]))
        if rarely(draw, 12):
            kind = draw(
                st.sampled_from(["repeated", "list", "differing", "sign", "hex", "empty", "huge"])
            )
        if kind == "short" and body:
            cut = draw(st.integers(0, len(body) - 1))
            body, tail, length = body[:cut], body[cut:], b"%d" % cut
        value = {
            "spaces": b"  " + length + b" ",
            "zeros": b"00" + length,
            "long": b"%d" % (len(body) + 1),
            "list": length + b", " + length,
            "sign": b"+" + length,
            "hex": b"0x%x" % len(body),
            "empty": b"",
            "huge": b"9" * 25,
        }.get(kind, length)
        fields.append(header_line(draw, b"Content-Length", value, stricter))
        if kind in ("repeated", "differing"):
            other = length if kind == "repeated" else b"%d" % (len(body) + 7)
            fields.append(b"content-length: " + other + CRLF)
        if kind in ("repeated", "list"):
            stricter.append("repeated length")
        payload = body
    elif framing in ("chunked", "both"):
        coding = draw(st.sampled_from([b"chunked", b"Chunked", b"CHUNKED", b" chunked "]))
        fields.append(b"Transfer-Encoding: " + coding + CRLF)
        if framing == "both":
            fields.insert(
                draw(st.integers(0, 1)), b"Content-Length: %d\r\n" % draw(st.integers(0, 99))
            )
        payload = chunked(draw, body, [] if bodiless else stricter)
    elif framing == "close":
        payload = body
    elif framing == "coded":
        lenient.append("coded")
        codings = draw(
            st.sampled_from(
                [[b"gzip, chunked"], [b"gzip", b"chunked"], [b"gzip"], [b"identity"], [b"br, gzip"]]
            )
        )
        fields += [b"Transfer-Encoding: " + coding + CRLF for coding in codings]
        if codings[-1].endswith(b"chunked"):
            canonical_fields = [b"Transfer-Encoding: chunked\r\n"]
            payload = chunked(draw, body, [] if bodiless else stricter)
        else:
            canonical_fields = []  # read until the close, as with no framing at all
            payload = body
    else:  # "bad coding": both refuse
        coding = draw(
            st.sampled_from(
                [b"chunked, gzip", b"chunked, chunked", b"chunked,", b'"chunked"', b"chunked;q=1"]
            )
        )
        fields.append(b"Transfer-Encoding: " + coding + CRLF)
        payload = chunked(draw, body, [] if bodiless else stricter)
    if bodiless:
        payload, tail = b"", b""

    others = [
        header_line(draw, draw(names), draw(values), stricter)
        for _ in range(draw(st.integers(0, 5)))
    ]
    connection = draw(
        st.sampled_from(
            [None] * 4 + [b"close", b"keep-alive", b"close, X-Foo", b"x-bar , Keep-Alive"]
        )
    )
    if connection is not None:
        others.append(b"Connection: " + connection + CRLF)
    others = list(draw(st.permutations(others)))
    at = draw(st.integers(0, len(others)))
    tail += draw(st.sampled_from([b""] * 8 + [CRLF, b"garbage", b"HTTP/1.1 200 OK\r\n"]))

    def render(canonical: bool) -> bytes:
        framing_fields = fields if not canonical or canonical_fields is None else canonical_fields
        start = b"" if canonical or not leading_crlf else CRLF
        phrase = reason.replace(b"\x00", b"") if canonical else reason
        status_line = b"HTTP/" + version + b" " + token + phrase + CRLF
        head_fields = b"".join(others[:at] + framing_fields + others[at:])
        return start + interim + status_line + head_fields + CRLF + payload + tail

    wire, canonical = render(False), render(True)
    if rarely(draw, 8):  # cut short: the same bytes off the end of both
        cut = draw(st.integers(1, len(wire)))
        wire, canonical = wire[:-cut], canonical[: max(0, len(canonical) - cut)]
    splits = sorted(draw(st.sets(st.integers(1, max(1, len(wire) - 1)), max_size=6)))
    bounds = [0, *splits, len(wire)]
    pieces = [(wire[a:b], draw(st.integers(0, 3))) for a, b in itertools.pairwise(bounds)]
    return Case(method, wire, canonical, pieces, sorted(set(stricter)), sorted(set(lenient)))


# --- the property ------------------------------------------------------------------------------


@FUZZ
@given(case=responses(), keep_open=st.booleans())
def test_the_client_reads_a_response_as_h11_does(
    upstream_loop: tuple[asyncio.Runner, Upstream], case: Case, keep_open: bool
) -> None:
    """Same status, exposed headers and body as h11, or a refusal where h11 refuses;
    never a hang. `--hypothesis-show-statistics` shows how the cases fell."""
    assert set(case.stricter) <= STRICTER.keys()
    assert set(case.lenient) <= LENIENT.keys()
    runner, upstream = upstream_loop
    expected = h11_reads(case.method, case.wire, eof=True)
    # The server keeps the connection open only when h11 needs no close to end the
    # answer: then the client must end it without one too, or it hangs.
    keep_open = keep_open and isinstance(h11_reads(case.method, case.wire, eof=False), Accepted)
    try:
        ours = runner.run(client_reads(upstream, case, keep_open))
    except TimeoutError:
        pytest.fail(f"the client hung (h11: {expected})")
    assert not (isinstance(ours, Refused) and ours.timed_out), "the client waited for a timeout"

    drop_coding = False
    if isinstance(expected, Refused) and case.lenient:
        put_right = h11_reads(case.method, case.canonical, eof=True)
        if isinstance(put_right, Accepted):
            expected, drop_coding = put_right, "coded" in case.lenient
    event(f"h11 {type(expected).__name__} (put right), client {type(ours).__name__}")
    for tag in case.stricter + case.lenient:
        event(tag)
    if keep_open:
        event("kept open")
    if isinstance(expected, Accepted) and not case.stricter:
        assert isinstance(ours, Accepted), f"refused what h11 accepts: {ours}"
        assert compared(ours, drop_coding=drop_coding) == compared(
            exposed(expected), drop_coding=drop_coding
        )
    else:
        why = [STRICTER[tag] for tag in case.stricter] or [str(expected)]
        assert isinstance(ours, Refused), f"accepted what should be refused: {why}"
