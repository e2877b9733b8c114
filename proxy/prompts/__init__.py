"""Task age without a header (SPEC 10): remembering when each prompt was first seen.

Pure: no I/O, no asyncio, no clock; times arrive as arguments.
"""

from proxy.prompts.memory import PromptMemory

__all__ = ["PromptMemory"]
