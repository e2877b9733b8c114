"""`ResponseIdCatcher`: the relay finds a Responses answer's id in the first bytes of
its body, however the upstream splits them, and stops looking after a bound."""

from __future__ import annotations

from proxy.edge.relay import ResponseIdCatcher

STREAM = (
    b"event: response.created\n"
    b'data: {"type":"response.created","sequence_number":0,'
    b'"response":{"id":"resp_abc123","object":"response","output":[{"id":"msg_1"}]}}\n\n'
)


def feed(chunks: list[bytes]) -> list[str]:
    found: list[str] = []
    catcher = ResponseIdCatcher(found.append)
    for chunk in chunks:
        if catcher(chunk):
            break
    return found


def test_the_first_id_of_a_json_body() -> None:
    assert feed([b'{"id": "resp_1", "object": "response", "output": [{"id": "msg_2"}]}']) == [
        "resp_1"
    ]


def test_the_response_id_of_a_stream_split_at_every_byte() -> None:
    assert feed([STREAM[i : i + 1] for i in range(len(STREAM))]) == ["resp_abc123"]


def test_it_gives_up_after_the_limit_without_finding_anything() -> None:
    catcher = ResponseIdCatcher(lambda rid: None)
    assert not catcher(b" " * (ResponseIdCatcher.LIMIT - 1))
    assert catcher(b" " * 10)  # past the limit: done, nothing found


def test_an_id_beyond_the_limit_is_not_looked_for() -> None:
    assert feed([b" " * ResponseIdCatcher.LIMIT, b'{"id": "resp_late"}']) == []
