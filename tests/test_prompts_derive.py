"""derive: naming the current prompt from a request body (SPEC 10), one rule per test.

The bodies are shaped like what the agents send: Codex (Responses, injected user
context), Claude Code (Messages, reminders, tool results, moving cache
breakpoints, the billing line), plain Chat clients.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.prompts import (
    UNKNOWN,
    Derivation,
    Dialect,
    agent_started_at_ms,
    conversation_from_headers,
    derive,
    dialect_for,
    response_key,
)

Body = dict[str, Any]


def key(dialect: Dialect, body: Body, conversation_id: str | None = None) -> bytes:
    """The prompt key of `body`, which must name one."""
    derivation = derive(dialect, orjson.dumps(body), conversation_id)
    assert derivation.prompt_key is not None, derivation
    assert derivation.previous_response_id is None
    return derivation.prompt_key


def chat(*messages: dict[str, Any]) -> Body:
    return {"model": "m", "stream": True, "messages": list(messages)}


def system(text: str) -> dict[str, Any]:
    return {"role": "system", "content": text}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def tool_call(call_id: str) -> dict[str, Any]:
    function = {"name": "shell", "arguments": '{"cmd": "ls"}'}
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": call_id, "type": "function", "function": function}],
    }


def tool_result(call_id: str, output: str = "a.py\nb.py") -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": output}


ALL_DIALECTS: tuple[Dialect, ...] = ("chat", "responses", "messages")
SYSTEM = system("You are a coding agent.")
ASK = user("Fix the failing test in tests/test_a.py")


# --- dialects -------------------------------------------------------------------------


def test_dialect_for_maps_the_three_body_paths() -> None:
    assert dialect_for("/chat/completions") == "chat"
    assert dialect_for("/responses") == "responses"
    assert dialect_for("/messages") == "messages"


def test_dialect_for_tolerates_one_trailing_slash() -> None:
    assert dialect_for("/chat/completions/") == "chat"
    assert dialect_for("/responses/") == "responses"
    assert dialect_for("/messages/") == "messages"


@pytest.mark.parametrize(
    "path", ["/completions", "/embeddings", "/responses/compact", "/chat", "/", "", "//"]
)
def test_dialect_for_other_paths_is_none(path: str) -> None:
    assert dialect_for(path) is None


# --- identity: tool rounds, retries, new turns ------------------------------------------


def test_a_tool_round_keeps_the_key() -> None:
    first = chat(SYSTEM, ASK)
    round_1 = chat(SYSTEM, ASK, tool_call("c1"), tool_result("c1"))
    round_2 = chat(
        SYSTEM, ASK, tool_call("c1"), tool_result("c1"), tool_call("c2"), tool_result("c2")
    )
    assert key("chat", first) == key("chat", round_1) == key("chat", round_2)


def test_a_retry_keeps_the_key_whatever_the_json_spacing_and_key_order() -> None:
    body = chat(SYSTEM, ASK, tool_call("c1"), tool_result("c1"))
    compact = orjson.dumps(body)
    spaced = orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    assert derive("chat", compact, None) == derive("chat", compact, None)
    assert derive("chat", compact, None) == derive("chat", spaced, None)


def test_a_new_user_turn_changes_the_key() -> None:
    before = chat(SYSTEM, ASK, tool_call("c1"), tool_result("c1"), assistant("Done."))
    after = chat(*before["messages"], user("Now run the whole suite"))
    assert key("chat", before) != key("chat", after)


def test_the_same_text_at_a_later_turn_is_a_new_prompt() -> None:
    """ "yes" answering a second question is not the "yes" that answered the first."""
    one = chat(SYSTEM, ASK, assistant("Shall I?"), user("yes"))
    two = chat(*one["messages"], assistant("And this too?"), user("yes"))
    assert key("chat", one) != key("chat", two)


def test_tool_and_function_messages_are_not_prompt_turns() -> None:
    base = chat(SYSTEM, ASK)
    legacy = chat(SYSTEM, ASK, {"role": "function", "name": "shell", "content": "a.py"})
    tooled = chat(SYSTEM, ASK, tool_call("c1"), tool_result("c1"))
    assert key("chat", base) == key("chat", legacy) == key("chat", tooled)


def test_different_conversations_with_the_same_last_user_text_differ() -> None:
    other_opening = chat(SYSTEM, user("Write a README"), assistant("Done."), user("thanks"))
    this_opening = chat(SYSTEM, ASK, assistant("Done."), user("thanks"))
    other_system = chat(system("You are a poet."), ASK, assistant("Done."), user("thanks"))
    keys = {key("chat", other_opening), key("chat", this_opening), key("chat", other_system)}
    assert len(keys) == 3


def test_a_conversation_id_overrides_the_opening() -> None:
    one = chat(SYSTEM, ASK, assistant("Done."), user("thanks"))
    other = chat(
        system("You are a poet."), user("Write a sonnet"), assistant("Done."), user("thanks")
    )
    assert key("chat", one) != key("chat", other)
    assert key("chat", one, "session-1") == key("chat", other, "session-1")
    assert key("chat", one, "session-1") != key("chat", one, "session-2")


def test_an_empty_conversation_id_is_no_conversation_id() -> None:
    body = chat(SYSTEM, ASK)
    assert key("chat", body, "") == key("chat", body, None)


def test_empty_and_missing_system_prompts_name_the_same_opening() -> None:
    missing = chat(ASK)
    empty = chat(system(""), ASK)
    assert key("chat", missing) == key("chat", empty)
    assert key("chat", missing) != key("chat", chat(SYSTEM, ASK))


def test_a_system_message_after_the_first_prompt_is_not_in_the_opening() -> None:
    """Claude Code 2.x inserts system messages mid-conversation; they change nothing."""
    plain = chat(SYSTEM, ASK, tool_call("c1"), tool_result("c1"))
    noted = chat(SYSTEM, ASK, system("Context is 80% full."), tool_call("c1"), tool_result("c1"))
    assert key("chat", plain) == key("chat", noted)


def test_developer_messages_before_the_first_prompt_are_in_the_opening() -> None:
    plain = chat(SYSTEM, ASK)
    developer = chat(SYSTEM, {"role": "developer", "content": "Be terse."}, ASK)
    assert key("chat", plain) != key("chat", developer)


# --- content -----------------------------------------------------------------------------


def test_content_as_a_string_or_as_text_parts_names_the_same_prompt() -> None:
    text = "Fix the failing test"
    as_string = chat(SYSTEM, user(text))
    as_parts = chat(SYSTEM, user([{"type": "text", "text": text}]))
    assert key("chat", as_string) == key("chat", as_parts)


def test_an_image_beside_the_text_is_part_of_the_prompt() -> None:
    text = {"type": "text", "text": "What is wrong here?"}
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    other = {"type": "image_url", "image_url": {"url": "data:image/png;base64,BBBB"}}
    keys = {
        key("chat", chat(SYSTEM, user([text]))),
        key("chat", chat(SYSTEM, user([text, image]))),
        key("chat", chat(SYSTEM, user([text, other]))),
    }
    assert len(keys) == 3


def test_a_user_message_with_an_image_only_is_a_prompt_turn() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    before = chat(SYSTEM, ASK, assistant("Done."))
    after = chat(*before["messages"], user([image]))
    assert key("chat", before) != key("chat", after)


def test_the_last_prompt_content_is_digested_not_just_its_length() -> None:
    one = chat(SYSTEM, ASK, assistant("Done."), user("run it"))
    two = chat(SYSTEM, ASK, assistant("Done."), user("fix it"))
    assert key("chat", one) != key("chat", two)


# --- Codex: Responses, injected user context -----------------------------------------------


def message(role: str, *texts: str, kind: str = "input_text") -> dict[str, Any]:
    return {
        "type": "message",
        "role": role,
        "content": [{"type": kind, "text": text} for text in texts],
    }


def responses(*items: dict[str, Any], **fields: Any) -> Body:
    return {"model": "gpt-5", "instructions": "You are Codex.", "input": list(items), **fields}


CODEX_PERMISSIONS = message(
    "developer", "<permissions instructions>sandbox</permissions instructions>"
)
CODEX_AGENTS_MD = message(
    "user", "# AGENTS.md instructions for /repo\n\n<INSTRUCTIONS>\nRun make test.\n</INSTRUCTIONS>"
)
CODEX_ENVIRONMENT = message(
    "user",
    "<environment_context>\n  <cwd>/repo</cwd>\n  <shell>bash</shell>\n</environment_context>",
)
CODEX_ASK = message("user", "fix the flaky test")


def codex_call(call_id: str) -> list[dict[str, Any]]:
    return [
        {"type": "reasoning", "summary": [], "encrypted_content": "gAAA"},
        {"type": "function_call", "name": "shell", "arguments": "{}", "call_id": call_id},
        {"type": "function_call_output", "call_id": call_id, "output": "ok"},
    ]


def test_codex_injected_user_context_is_not_a_prompt_turn() -> None:
    """Codex sends AGENTS.md and the environment as role `user` before the prompt;
    the key is that of the prompt alone, as if they were not there."""
    with_context = responses(CODEX_PERMISSIONS, CODEX_AGENTS_MD, CODEX_ENVIRONMENT, CODEX_ASK)
    without = responses(CODEX_PERMISSIONS, CODEX_ASK)
    assert key("responses", with_context) == key("responses", without)


def test_codex_tool_rounds_keep_the_key() -> None:
    opening = [CODEX_PERMISSIONS, CODEX_AGENTS_MD, CODEX_ENVIRONMENT, CODEX_ASK]
    first = responses(*opening)
    later = responses(*opening, *codex_call("c1"), *codex_call("c2"))
    assert key("responses", first) == key("responses", later)


def test_codex_context_injected_mid_task_keeps_the_key() -> None:
    """A sub-agent's notification arrives as a user message between tool rounds."""
    opening = [CODEX_PERMISSIONS, CODEX_ENVIRONMENT, CODEX_ASK]
    notice = message("user", '<subagent_notification>{"done": true}</subagent_notification>')
    aborted = message("user", "<turn_aborted>\nThe user interrupted.\n</turn_aborted>")
    plain = responses(*opening, *codex_call("c1"))
    noticed = responses(*opening, *codex_call("c1"), notice, aborted)
    assert key("responses", plain) == key("responses", noticed)


def test_codex_next_prompt_after_new_environment_context_is_a_new_prompt() -> None:
    opening = [CODEX_PERMISSIONS, CODEX_ENVIRONMENT, CODEX_ASK, *codex_call("c1")]
    done = message("assistant", "Fixed.", kind="output_text")
    moved = message("user", "<environment_context><cwd>/repo/sub</cwd></environment_context>")
    nxt = message("user", "now the docs")
    assert key("responses", responses(*opening, done)) != key(
        "responses", responses(*opening, done, moved, nxt)
    )


def test_injected_context_markers_are_matched_trimmed_and_case_blind() -> None:
    ask = chat(SYSTEM, ASK)
    shouted = user("  \n<ENVIRONMENT_CONTEXT><cwd>/r</cwd></Environment_Context>\n")
    assert key("chat", ask) == key("chat", chat(SYSTEM, ASK, shouted))


def test_text_that_only_starts_like_injected_context_is_a_prompt() -> None:
    ask = chat(SYSTEM, ASK)
    quoted = user("<environment_context> is the tag Codex uses; why?")
    assert key("chat", ask) != key("chat", chat(SYSTEM, ASK, quoted))


def test_a_user_message_of_only_injected_context_is_not_the_first_prompt() -> None:
    """With no real prompt at all there is nothing to name."""
    assert derive("responses", orjson.dumps(responses(CODEX_ENVIRONMENT)), None) == UNKNOWN


def test_responses_string_input_is_one_user_prompt_turn() -> None:
    as_string = {"model": "m", "instructions": "Be brief.", "input": "hello"}
    as_item = {"model": "m", "instructions": "Be brief.", "input": [user("hello")]}
    assert key("responses", as_string) == key("responses", as_item)


def test_responses_items_with_a_role_and_no_type_are_messages() -> None:
    typed = responses(message("user", "hello"))
    untyped = responses({"role": "user", "content": [{"type": "input_text", "text": "hello"}]})
    assert key("responses", typed) == key("responses", untyped)
    assert key("responses", responses(message("user", "hello"), message("user", "again"))) == key(
        "responses", responses(message("user", "hello"), user("again"))
    )


@pytest.mark.parametrize(
    "item",
    [
        {"type": "function_call_output", "call_id": "c1", "output": "x", "role": "user"},
        {"type": "custom_tool_call_output", "call_id": "c1", "output": "x"},
        {"type": "reasoning", "summary": []},
        {"type": "item_reference", "id": "msg_1"},
    ],
)
def test_responses_items_that_are_not_messages_are_not_prompt_turns(item: dict[str, Any]) -> None:
    assert key("responses", responses(CODEX_ASK)) == key("responses", responses(CODEX_ASK, item))


def test_responses_instructions_are_in_the_opening() -> None:
    one = responses(CODEX_ASK, instructions="You are Codex.")
    two = responses(CODEX_ASK, instructions="You are someone else.")
    assert key("responses", one) != key("responses", two)


# --- Responses: previous_response_id --------------------------------------------------------


def test_no_new_prompt_and_a_previous_response_inherits_its_time() -> None:
    body = {"model": "m", "previous_response_id": "resp_1", "input": codex_call("c1")[2:]}
    assert derive("responses", orjson.dumps(body), "s") == Derivation(None, "resp_1")


def test_no_input_at_all_and_a_previous_response_inherits_its_time() -> None:
    body = {"model": "m", "previous_response_id": "resp_1"}
    assert derive("responses", orjson.dumps(body), None) == Derivation(None, "resp_1")


def test_only_injected_context_and_a_previous_response_inherits_its_time() -> None:
    body = {"model": "m", "previous_response_id": "resp_1", "input": [CODEX_ENVIRONMENT]}
    assert derive("responses", orjson.dumps(body), None) == Derivation(None, "resp_1")


def test_a_new_prompt_after_a_previous_response_is_a_new_prompt_per_response() -> None:
    def body(previous: str) -> Body:
        return {"model": "m", "previous_response_id": previous, "input": [user("go on")]}

    after_1 = key("responses", body("resp_1"), "s")
    assert after_1 == key("responses", body("resp_1"), "s")  # a retry
    assert after_1 != key("responses", body("resp_2"), "s")  # "go on" again, later
    assert after_1 != key("responses", body("resp_1"), "t")  # another conversation
    assert after_1 != key("responses", {"model": "m", "input": [user("go on")]}, "s")


def test_an_empty_previous_response_id_is_none() -> None:
    body = {"model": "m", "input": [user("hi")]}
    assert key("responses", {**body, "previous_response_id": ""}) == key("responses", body)
    assert key("responses", {**body, "previous_response_id": None}) == key("responses", body)
    assert derive("responses", orjson.dumps({"model": "m", "previous_response_id": ""}), None) == (
        UNKNOWN
    )


def test_a_previous_response_id_that_is_not_a_string_is_unreadable() -> None:
    body = {"model": "m", "previous_response_id": 7, "input": [user("hi")]}
    assert derive("responses", orjson.dumps(body), None) == UNKNOWN


# --- Claude Code: Messages ------------------------------------------------------------------

BREAKPOINT = {"type": "ephemeral"}


def text(value: str, cached: bool = False) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": value}
    if cached:
        block["cache_control"] = BREAKPOINT
    return block


def billing(nonce: str) -> dict[str, Any]:
    return text(
        f"x-anthropic-billing-header: cc_version=2.1.150.abc; cc_entrypoint=cli; cch={nonce};"
    )


def claude(*messages: dict[str, Any], nonce: str = "36ee5") -> Body:
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": 32000,
        "system": [
            billing(nonce),
            text("You are Claude Code, Anthropic's official CLI for Claude.", cached=True),
            text("You are an interactive CLI tool...", cached=True),
        ],
        "messages": list(messages),
    }


def reminder(body: str) -> dict[str, Any]:
    return text(f"<system-reminder>\n{body}\n</system-reminder>\n")


def claude_ask(date: str = "2026-06-22", cached: bool = False) -> dict[str, Any]:
    context = reminder(f"As you answer, use this context:\n# claudeMd\n...\n# currentDate\n{date}")
    return user([context, text("Fix the failing test", cached=cached)])


def tool_use(call_id: str) -> dict[str, Any]:
    block = {"type": "tool_use", "id": call_id, "name": "Bash", "input": {"command": "ls"}}
    return {"role": "assistant", "content": [block]}


def claude_result(call_id: str, *beside: dict[str, Any], cached: bool = False) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id, "content": "a.py"}
    if cached:
        block["cache_control"] = BREAKPOINT
    return user([block, *beside])


def test_claude_tool_rounds_keep_the_key_while_the_cache_breakpoint_moves() -> None:
    """The person's message carries the breakpoint while it is the last message,
    and loses it on the next round."""
    first = claude(claude_ask(cached=True))
    later = claude(claude_ask(), tool_use("t1"), claude_result("t1", cached=True))
    assert key("messages", first) == key("messages", later)


def test_the_moving_cache_breakpoint_on_an_image_block_is_not_content() -> None:
    source = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    image = {"type": "image", "source": source}
    first = claude(user([text("What is wrong here?"), {**image, "cache_control": BREAKPOINT}]))
    later = claude(
        user([text("What is wrong here?"), image]),
        tool_use("t1"),
        claude_result("t1", cached=True),
    )
    assert key("messages", first) == key("messages", later)


def test_a_tool_result_with_text_beside_it_is_not_a_prompt_turn() -> None:
    plain = claude(claude_ask(), tool_use("t1"), claude_result("t1"))
    beside = claude(
        claude_ask(),
        tool_use("t1"),
        claude_result("t1", reminder("The task tools haven't been used recently."), text("and X")),
    )
    assert key("messages", plain) == key("messages", beside)


def test_claude_reminder_blocks_in_the_prompt_message_do_not_name_it() -> None:
    """The context reminder at the front of the first message is rebuilt by Claude
    Code (its date, CLAUDE.md); the prompt is what the person typed."""
    assert key("messages", claude(claude_ask(date="2026-06-22"))) == key(
        "messages", claude(claude_ask(date="2026-06-23"))
    )


def test_claude_billing_line_does_not_name_the_conversation() -> None:
    """`cch=` changes on every request (anthropics/claude-code#68900)."""
    ask = claude_ask()
    assert key("messages", claude(ask, nonce="36ee5")) == key(
        "messages", claude(ask, nonce="0aaa9")
    )


def test_messages_system_as_a_string_or_text_blocks_names_the_same_opening() -> None:
    ask = user("hello")
    as_string = {"model": "m", "max_tokens": 9, "system": "Be brief.", "messages": [ask]}
    as_blocks = {**as_string, "system": [text("Be brief.", cached=True)]}
    no_system = {**as_string, "system": []}
    assert key("messages", as_string) == key("messages", as_blocks)
    assert key("messages", as_string) != key("messages", no_system)


def test_messages_new_user_turn_changes_the_key() -> None:
    before = claude(claude_ask(), tool_use("t1"), claude_result("t1"), assistant("Fixed."))
    after = claude(*before["messages"], user("thanks, now commit"))
    assert key("messages", before) != key("messages", after)


# --- never an error ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"{",
        b"\xff\xfe",
        b"[]",
        b'"a string"',
        b"42",
        b"null",
        b'{"messages": "hi"}',
        b'{"messages": {"role": "user"}}',
        b'{"messages": ["hi"]}',
        b'{"messages": [null]}',
        b'{"messages": [{"role": "user", "content": 5}]}',
        b'{"messages": [{"role": "user", "content": null}]}',
        b'{"messages": [{"role": "user", "content": ["hi"]}]}',
        b'{"messages": [{"role": "user", "content": [{"type": ["text"], "text": "hi"}]}]}',
        b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "m"}',
        b'{"messages": []}',
        b'{"messages": [{"role": "system", "content": "x"}, {"role": "assistant"}]}',
    ],
)
@pytest.mark.parametrize("dialect", ["chat", "messages"])
def test_unreadable_chat_and_messages_bodies_name_nothing(raw: bytes, dialect: Dialect) -> None:
    assert derive(dialect, raw, None) == UNKNOWN


@pytest.mark.parametrize("system", [5, {"text": "x"}, ["x"], True])
def test_an_unreadable_messages_system_names_nothing(system: Any) -> None:
    body = {"system": system, "messages": [user("hi")]}
    assert derive("messages", orjson.dumps(body), None) == UNKNOWN
    assert key("chat", body) == key("chat", {"messages": [user("hi")]})  # Chat does not read it


@pytest.mark.parametrize(
    "raw",
    [
        b'{"input": 5}',
        b'{"input": {"role": "user"}}',
        b'{"input": [5]}',
        b'{"input": [{"type": 5, "role": "user", "content": "x"}]}',
        b'{"input": [{"role": "user", "content": {"text": "x"}}]}',
        b'{"input": [{"type": "function_call_output", "output": "x"}]}',
        b'{"input": "hi", "instructions": 5}',
        b'{"model": "m"}',
        b'{"input": []}',
    ],
)
def test_unreadable_responses_bodies_name_nothing(raw: bytes) -> None:
    assert derive("responses", raw, None) == UNKNOWN


def test_an_unknown_dialect_names_nothing() -> None:
    body = orjson.dumps(chat(SYSTEM, ASK))
    assert derive("completions", body, None) == UNKNOWN  # type: ignore[arg-type]


@pytest.mark.parametrize("depth", [1_025, 100_000])
def test_deep_nesting_names_nothing(depth: int) -> None:
    bare = b"[" * depth + b"]" * depth
    inside = b'{"messages": [{"role": "user", "content": ' + bare + b"}]}"
    for raw in (bare, inside):
        for dialect in ALL_DIALECTS:
            assert derive(dialect, raw, None) == UNKNOWN


def test_a_part_nested_too_deep_to_digest_names_nothing() -> None:
    """Parsable (under orjson's 1024) but deeper than its encoder's limit."""
    deep = b"[" * 600 + b"]" * 600
    raw = b'{"messages": [{"role": "user", "content": [{"type": "image", "x": ' + deep + b"}]}]}"
    assert derive("chat", raw, None) == UNKNOWN
    assert derive("chat", raw, "session") == UNKNOWN


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)
PLAUSIBLE = st.fixed_dictionaries(
    {},
    optional={
        "messages": JSON,
        "input": JSON,
        "system": JSON,
        "instructions": JSON,
        "previous_response_id": JSON,
    },
)
ROLES = st.sampled_from(["user", "assistant", "system", "developer", "tool", 5, None])
MESSAGE = st.fixed_dictionaries(
    {"role": ROLES},
    optional={"content": JSON, "type": st.sampled_from(["message", "reasoning", 3, None])},
)
HISTORY = st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, max_size=6), "input": st.lists(MESSAGE, max_size=6)}
)
DIALECTS = st.sampled_from(ALL_DIALECTS)
CONVERSATION = st.none() | st.text(max_size=8)


@settings(max_examples=300, deadline=None)
@given(value=JSON | PLAUSIBLE | HISTORY, dialect=DIALECTS, conversation=CONVERSATION)
def test_derive_never_raises_on_any_json(
    value: Any, dialect: Dialect, conversation: str | None
) -> None:
    raw = orjson.dumps(value)
    derivation = derive(dialect, raw, conversation)
    assert isinstance(derivation, Derivation)
    assert derive(dialect, raw, conversation) == derivation  # the same body, the same answer


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200), dialect=DIALECTS)
def test_derive_never_raises_on_any_bytes(raw: bytes, dialect: Dialect) -> None:
    assert isinstance(derive(dialect, raw, None), Derivation)


# --- the memory's other key ---------------------------------------------------------------


def test_response_key_is_a_stable_digest_per_id() -> None:
    assert response_key("resp_1") == response_key("resp_1")
    assert response_key("resp_1") != response_key("resp_2")
    assert len(response_key("resp_1")) == 16
    assert b"resp_1" not in response_key("resp_1")


# --- headers ----------------------------------------------------------------------------------


def test_x_conversation_id_wins_over_every_agent_session_header() -> None:
    headers = [
        (b"x-claude-code-session-id", b"claude"),
        (b"session-id", b"codex"),
        (b"x-session-id", b"opencode"),
        (b"x-conversation-id", b"ours"),
    ]
    assert conversation_from_headers(headers) == "ours"


@pytest.mark.parametrize(
    ("present", "expected"),
    [
        (
            [b"session-id", b"session_id", b"x-session-id", b"x-claude-code-session-id"],
            "session-id",
        ),
        ([b"session_id", b"x-session-id", b"x-claude-code-session-id"], "session_id"),
        ([b"x-session-affinity", b"x-claude-code-session-id", b"x-session-id"], "x-session-id"),
        ([b"x-session-affinity", b"x-claude-code-session-id"], "x-claude-code-session-id"),
        ([b"x-session-affinity"], "x-session-affinity"),
    ],
)
def test_agent_session_headers_in_order(present: list[bytes], expected: str) -> None:
    headers = [(name, name) for name in present]
    assert conversation_from_headers(headers) == expected


def test_a_blank_session_header_counts_as_absent_and_values_are_trimmed() -> None:
    headers = [(b"x-conversation-id", b"  "), (b"session-id", b" abc-123 ")]
    assert conversation_from_headers(headers) == "abc-123"


def test_the_first_of_repeated_session_headers_is_used() -> None:
    headers = [(b"session-id", b"one"), (b"session-id", b"two")]
    assert conversation_from_headers(headers) == "one"


def test_no_session_header_is_no_conversation() -> None:
    headers = [(b"authorization", b"Bearer x"), (b"x-request-id", b"r1"), (b"thread-id", b"t")]
    assert conversation_from_headers(headers) is None
    assert conversation_from_headers([]) is None


def test_session_header_bytes_that_are_not_utf8_still_give_an_id() -> None:
    assert conversation_from_headers([(b"session-id", b"\xff\xfe")]) == "\xff\xfe"


def turn_metadata(value: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"session-id", b"s"), (b"x-codex-turn-metadata", value)]


def test_codex_turn_start_is_read_from_its_turn_metadata() -> None:
    metadata = orjson.dumps(
        {
            "session_id": "s",
            "turn_id": "t",
            "sandbox": "none",
            "workspaces": {"/repo": {"has_changes": False}},
            "turn_started_at_unix_ms": 1_760_000_000_123,
        }
    )
    assert agent_started_at_ms(turn_metadata(metadata)) == 1_760_000_000_123.0


def test_a_turn_start_sent_as_digits_is_read() -> None:
    metadata = b'{"turn_started_at_unix_ms": "1760000000123"}'
    assert agent_started_at_ms(turn_metadata(metadata)) == 1_760_000_000_123.0


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"not json",
        b"[1760000000123]",
        b"1760000000123",
        b"{}",
        b'{"turn_started_at_unix_ms": null}',
        b'{"turn_started_at_unix_ms": 0}',
        b'{"turn_started_at_unix_ms": -5}',
        b'{"turn_started_at_unix_ms": true}',
        b'{"turn_started_at_unix_ms": "soon"}',
        b'{"turn_started_at_unix_ms": "-1"}',
        b'{"turn_started_at_unix_ms": ""}',
        b'{"turn_started_at_unix_ms": "99999999999999999999"}',
        b'{"turn_started_at_unix_ms": [1]}',
        b'{"turn_started_at_unix_ms": 1e999}',
        b"[" * 5000,
    ],
)
def test_an_unreadable_turn_start_is_none(value: bytes) -> None:
    assert agent_started_at_ms(turn_metadata(value)) is None


def test_no_turn_metadata_is_no_turn_start() -> None:
    assert agent_started_at_ms([(b"session-id", b"s")]) is None
