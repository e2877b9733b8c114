"""Naming the client's current prompt from the request body (docs/design.md, "Task age").

A coding agent resends its whole conversation on every model call: the person's
prompt, then the assistant's tool calls and the tool results, round after round.
`derive` reads that history and names the *current prompt* by a digest of

    (conversation, number of prompt turns, content of the last prompt turn)

so every tool round and every retry of one task gets the same key, and the next
thing the person types gets a new one. The relay looks the key up in a
`PromptMemory` to learn when that prompt was first seen.

What counts as a prompt turn (the contract, and what real agents send):

- A message with role `user` (Chat, Messages, Responses items of type
  `message` or with a role and no type). Not `tool` / `function` messages, not
  Responses items of any other type (`function_call_output`, `reasoning`, ...),
  and not a user message carrying a `tool_result` block (Anthropic Messages: that
  is how tool results travel, even with text blocks beside them).
- Not a user message made only of *injected context*: text an agent writes
  under the user role for the model, not typed by the person. Codex sends
  `<environment_context>`, `# AGENTS.md instructions for ...`, `<turn_aborted>`,
  `<subagent_notification>` and more as user messages, some of them *in the
  middle of a task* (a sub-agent finishing, a hook); Codex itself says these
  "must not create user-turn boundaries" (codex-rs/core/src/context/). Claude Code
  and opencode wrap theirs in `<system-reminder>`. Counting them would change
  the key mid-task; see `_MARKERS`.

What goes into the digests, and what is left out because it changes between
two requests of the same task:

- Injected-context text parts are dropped from the content digests, so Claude
  Code's CLAUDE.md / date reminder blocks, rebuilt at the front of the first
  user message, do not matter.
- `cache_control` is dropped from every part: Claude Code moves its cache
  breakpoint to the newest message on every round, so the person's message
  carries it on the first request and not on the next.
- A system text block starting `x-anthropic-billing-header:` is dropped: Claude
  Code puts a per-request nonce there (`cch=...`, anthropics/claude-code#68900).
- A text part and a plain string with the same text digest the same.

Known limits, where a body cannot say more:

- A compaction (Codex, Claude Code) rewrites the history, so the next request
  names a new prompt. Codex's own turn start (`agent_started_at_ms`) covers it.
- A sub-agent's requests (Claude Code's Task tool) name the sub-agent's prompt:
  its time is when the sub-agent started, not when the person's prompt did.
- Agents that send tool results as plain user text (the XML tool protocol of
  Cline and Roo Code) make every round a new prompt.
- Responses bodies continued by a server-side `conversation` rather than
  `previous_response_id` hold no prompt turn on tool rounds: arrival time.

`derive` never raises: a body it cannot read names nothing (`Derivation(None,
None)`) and the relay uses the arrival time. JSON parsing is orjson's (it refuses
nesting deeper than 1024, so nothing here recurses on the client's depth); the
code below only ever looks a fixed few levels down.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Literal

import orjson

Dialect = Literal["chat", "responses", "messages"]

_DIALECTS: dict[str, Dialect] = {
    "/chat/completions": "chat",
    "/responses": "responses",
    "/messages": "messages",
}


def dialect_for(path: str) -> Dialect | None:
    """The body dialect of an API path (the part after `/v1`), or None for paths
    whose bodies name no prompt. One trailing slash is tolerated."""
    if len(path) > 1 and path[-1] == "/":
        path = path[:-1]
    return _DIALECTS.get(path)


@dataclass(frozen=True, slots=True)
class Derivation:
    """What the body says about the current prompt.

    `prompt_key` names the current prompt (look it up in the memory);
    `previous_response_id` is set instead when a Responses request holds no new
    prompt turn and continues a stored response: the prompt started when that
    response's request did. Both None: the body names nothing, use the arrival
    time.
    """

    prompt_key: bytes | None
    previous_response_id: str | None


UNKNOWN = Derivation(None, None)
"""The body names no prompt."""


class _Unreadable(Exception):
    """A shape `derive` does not read; caught in `derive`."""


# --- digests -----------------------------------------------------------------


def _digest(*fields: bytes) -> bytes:
    """16 bytes naming the sequence of fields. Each field is length-prefixed, so
    no two different sequences feed the hash the same bytes. (SHA-256 rather than
    BLAKE2: with the SHA extensions it runs at twice the speed here.)"""
    h = hashlib.sha256()
    for field in fields:
        h.update(len(field).to_bytes(8, "big"))
        h.update(field)
    return h.digest()[:16]


def response_key(response_id: str) -> bytes:
    """The memory key of a response id (the memory keeps digests, never ids)."""
    return _digest(b"response", response_id.encode("utf-8", "surrogatepass"))


# --- injected context ----------------------------------------------------------

_MARKERS: tuple[tuple[str, str], ...] = (
    # Claude Code (context, reminders beside tool results) and opencode (plan mode,
    # messages typed while the agent works).
    ("<system-reminder>", "</system-reminder>"),
    # Codex: the contextual user fragments of codex-rs/core/src/context/ (matched
    # there the same way: trimmed, case-insensitive, start and end marker).
    ("# agents.md instructions for ", "</instructions>"),
    ("<user_instructions>", "</user_instructions>"),  # Codex before AGENTS.md headers
    ("<environment_context>", "</environment_context>"),
    ("<agents_instructions>", "</agents_instructions>"),
    ("<multiagent_context>", "</multiagent_context>"),
    ("<skill>", "</skill>"),
    ("<user_shell_command>", "</user_shell_command>"),
    ("<turn_aborted>", "</turn_aborted>"),
    ("<subagent_notification>", "</subagent_notification>"),
    ("<goal_context>", "</goal_context>"),
    ("<extension_context>", "</extension_context>"),
    ("<hook_prompt", "</hook_prompt>"),
)
_MAY_BE_INJECTED = frozenset("<# \t\n\r")
"""The first characters of an injected block, leading whitespace included."""
_LOOK = 96
"""How many characters at each end of a text the marker test reads: it must cost
the same for a 1 MB tool dump as for a line."""

_BILLING_HEADER = "x-anthropic-billing-header:"

_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})


def _is_injected(text: str) -> bool:
    """Whether `text` is one block of agent-injected context (see `_MARKERS`)."""
    if text[:1] not in _MAY_BE_INJECTED:
        return False  # the common case, without copying anything
    head = text[:_LOOK].lstrip().lower()
    tail = text[-_LOOK:].rstrip().lower()
    return any(head.startswith(start) and tail.endswith(end) for start, end in _MARKERS)


def _is_prompt(content: Any) -> bool:
    """Whether a user-role message with this content is a prompt turn."""
    if isinstance(content, str):
        # _is_injected's first test inlined: this runs for every user message.
        return content[:1] not in _MAY_BE_INJECTED or not _is_injected(content)
    if not isinstance(content, list):
        raise _Unreadable
    injected_only = bool(content)
    for part in content:
        if not isinstance(part, dict):
            raise _Unreadable
        kind = part.get("type")
        if kind == "tool_result":
            return False
        if injected_only:
            text = part.get("text")
            if not (kind in _TEXT_PARTS and isinstance(text, str) and _is_injected(text)):
                injected_only = False
    return not injected_only


# --- canonical content ---------------------------------------------------------


def _without_cache_control(part: dict[str, Any]) -> dict[str, Any]:
    if "cache_control" not in part:
        return part
    return {k: v for k, v in part.items() if k != "cache_control"}


def _prompt_canon(content: str | list[Any]) -> list[Any]:
    """A prompt turn's content as the list digested: text parts as their text,
    injected-context parts dropped, other parts without `cache_control`."""
    if isinstance(content, str):
        return [content]
    canon: list[Any] = []
    for part in content:  # _is_prompt has checked each part is an object
        text = part.get("text")
        if part.get("type") in _TEXT_PARTS and isinstance(text, str):
            if not _is_injected(text):
                canon.append(text)
        else:
            canon.append(_without_cache_control(part))
    return canon


def _system_canon(content: Any, canon: list[Any]) -> None:
    """Append system / developer / instructions content to `canon`, leaving out
    empty texts (an empty system prompt is no system prompt) and Claude Code's
    per-request billing line."""
    if content is None:
        return
    if isinstance(content, str):
        if content and not content.startswith(_BILLING_HEADER):
            canon.append(content)
        return
    if not isinstance(content, list):
        raise _Unreadable
    for part in content:
        if not isinstance(part, dict):
            raise _Unreadable
        text = part.get("text")
        if part.get("type") in _TEXT_PARTS and isinstance(text, str):
            if text and not text.startswith(_BILLING_HEADER):
                canon.append(text)
        else:
            canon.append(_without_cache_control(part))


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


# --- the history ----------------------------------------------------------------

_MESSAGE_KINDS = (None, "message")
_OPENING_ROLES = ("system", "developer")


@dataclass(slots=True)
class _Turns:
    """The prompt turns of a history: how many, the first and the last, and the
    system / developer contents before the first."""

    count: int
    first: str | list[Any]
    last: str | list[Any]
    system: list[Any]


def _turns(items: list[Any], typed: bool) -> _Turns | None:
    """The prompt turns of a Chat / Messages `messages` list, or of a Responses
    `input` list (`typed`: an item is a message when its `type` is "message" or
    absent; tool calls, outputs and reasoning are not). None when there is none.

    Every item's role is read, only user messages' contents. This runs over
    hundreds of items per request, so each pass is one comprehension; an item
    that is not an object fails its `.get` and makes the body unreadable.
    """
    if typed:
        roles = [item.get("role") if item.get("type") in _MESSAGE_KINDS else None for item in items]
    else:
        roles = [item.get("role") for item in items]
    prompts = [
        i for i, role in enumerate(roles) if role == "user" and _is_prompt(items[i].get("content"))
    ]
    if not prompts:
        return None
    first = prompts[0]
    system = [items[i].get("content") for i in range(first) if roles[i] in _OPENING_ROLES]
    return _Turns(len(prompts), items[first]["content"], items[prompts[-1]]["content"], system)


def derive(dialect: Dialect, body: bytes, conversation_id: str | None) -> Derivation:
    """Name the current prompt of a request body; never raises.

    `conversation_id` (from `conversation_from_headers`) names the conversation
    when given; else the conversation is named by its opening: the system /
    developer / instructions text and the first prompt turn.

    Responses with `previous_response_id`: when `input` holds no prompt turn the
    request continues that response's task (`Derivation(None, id)`). When it
    holds one, that is a new prompt, named by (conversation id if any, the
    previous response id, number and last of the prompt turns in `input`). The
    previous response id is in the key even when a conversation id is given: the
    input holds only the new turns, so two prompts of one conversation with the
    same text ("go on") would otherwise share a key, and the later one would
    inherit the earlier one's time.
    """
    try:
        return _derive(dialect, body, conversation_id)
    except Exception:  # a body we cannot read is forwarded with the arrival time
        return UNKNOWN


def _derive(dialect: Dialect, body: bytes, conversation_id: str | None) -> Derivation:
    doc = orjson.loads(body)
    if not isinstance(doc, dict):
        return UNKNOWN
    turns: _Turns | None
    if dialect == "responses":
        previous = doc.get("previous_response_id")
        if previous is not None and not isinstance(previous, str):
            return UNKNOWN
        items = doc.get("input")
        if isinstance(items, str):
            turns = _Turns(1, items, items, []) if _is_prompt(items) else None
        elif isinstance(items, list):
            turns = _turns(items, typed=True)
        elif items is None:  # no input at all: only the previous response to go on
            turns = None
        else:
            return UNKNOWN
        if previous:
            if turns is None:
                return Derivation(None, previous)
            key = _digest(
                b"continued",
                _id_bytes(conversation_id),
                previous.encode("utf-8", "surrogatepass"),
                b"%d" % turns.count,
                _dumps(_prompt_canon(turns.last)),
            )
            return Derivation(key, None)
        opening = doc.get("instructions")
    elif dialect == "chat" or dialect == "messages":
        items = doc.get("messages")
        if not isinstance(items, list):
            return UNKNOWN
        turns = _turns(items, typed=False)
        # A Chat body has its system prompt in `messages`, read by _turns.
        opening = doc.get("system") if dialect == "messages" else None
    else:
        return UNKNOWN
    if turns is None:
        return UNKNOWN
    if conversation_id:
        conversation = _digest(b"id", _id_bytes(conversation_id))
    else:
        system: list[Any] = []
        for content in (opening, *turns.system):
            _system_canon(content, system)
        conversation = _digest(b"opening", _dumps([system, _prompt_canon(turns.first)]))
    key = _digest(b"prompt", conversation, b"%d" % turns.count, _dumps(_prompt_canon(turns.last)))
    return Derivation(key, None)


def _id_bytes(conversation_id: str | None) -> bytes:
    return (conversation_id or "").encode("utf-8", "surrogatepass")


# --- headers ----------------------------------------------------------------------

_CONVERSATION_HEADERS = (
    b"x-conversation-id",  # ours
    b"session-id",  # Codex CLI (codex-rs/codex-api/src/requests/headers.rs)
    b"session_id",  # Codex CLI before it switched to `session-id`; pi
    b"x-session-id",  # opencode 1.17+
    b"x-claude-code-session-id",  # Claude Code 2.1.86+
    b"x-session-affinity",  # opencode (all versions, the same session id); pi
)
"""Headers naming the conversation, strongest first."""
_CONVERSATION_HEADER_SET = frozenset(_CONVERSATION_HEADERS)


def conversation_from_headers(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The conversation id the client sent, or None. `headers` as in ASGI: names
    lower-case. `X-Conversation-Id` wins, then the agents' session ids in the
    order of `_CONVERSATION_HEADERS`; a blank value counts as absent."""
    found: dict[bytes, str] = {}
    for name, value in headers:
        if name in _CONVERSATION_HEADER_SET and name not in found:
            text = value.decode("latin-1").strip()
            if text:
                found[name] = text
    for name in _CONVERSATION_HEADERS:
        if name in found:
            return found[name]
    return None


_TURN_METADATA = b"x-codex-turn-metadata"
_MAX_DIGITS = 17
"""A digit string longer than this is no epoch-ms time (10^17 ms is 3 million years)."""


def agent_started_at_ms(headers: list[tuple[bytes, bytes]]) -> float | None:
    """When the agent says the current turn started (epoch ms), or None.

    Codex CLI sends `x-codex-turn-metadata: {..., "turn_started_at_unix_ms": N}`
    (codex-rs/core/src/responses_metadata.rs); the value is fixed for a turn, tool
    rounds included. None when the header is absent, is not a JSON object, or the
    value is not a positive finite number. A string of digits is read as the
    number: some Codex-compatible clients send it so.
    """
    for name, value in headers:
        if name == _TURN_METADATA:
            return _turn_started_at(value)
    return None


def _turn_started_at(value: bytes) -> float | None:
    try:
        metadata = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(metadata, dict):
        return None
    started = metadata.get("turn_started_at_unix_ms")
    if isinstance(started, str) and 0 < len(started) <= _MAX_DIGITS and started.isascii():
        started = int(started) if started.isdigit() else None
    if isinstance(started, bool) or not isinstance(started, int | float):
        return None
    started = float(started)
    if not math.isfinite(started) or started <= 0:
        return None
    return started
