"""The one base of every error that means "the input is wrong" (a flag, a file, a value, the machine
it names): raised with a message naming the culprit, printed by the entry points as one line instead
of a traceback. Anything else is a bug and keeps its traceback. Kept free of imports, so that every
module (megatron_lm's too) can derive from it."""
from __future__ import annotations


class KotomambaError(Exception):
    """A user-facing error: its message names the flag, file, line or value at fault."""
