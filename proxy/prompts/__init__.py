"""Task age without a header (docs/design.md, "Task age"): naming the current prompt
from the request body and remembering when each prompt was first seen.

Pure: no I/O, no asyncio, no clock; times arrive as arguments. The relay parses
nothing itself: it calls `derive` (or the header helpers) and asks the memory.
"""

from proxy.prompts.derive import (
    UNKNOWN,
    Derivation,
    Dialect,
    agent_started_at_ms,
    conversation_from_headers,
    derive,
    dialect_for,
    response_key,
)
from proxy.prompts.memory import PromptMemory

__all__ = [
    "UNKNOWN",
    "Derivation",
    "Dialect",
    "PromptMemory",
    "agent_started_at_ms",
    "conversation_from_headers",
    "derive",
    "dialect_for",
    "response_key",
]
