"""Library errors name API arguments (``resume=True``); on the command line they name flags.

The library never mentions the CLI: a message says ``pass resume=True``, and this table turns
that into ``pass --resume`` before the CLI prints it.
"""

from __future__ import annotations

# API argument as library messages write it -> the flag that sets it.
ARGUMENT_FLAGS: dict[str, str] = {
    "allow_pickle=True": "--allow-pickle",
    "executor='ray'": "--executor ray",
    "force=True": "--force",
    "resume=False": "--no-resume",
    "resume=True": "--resume",
    "transfer=True": "--transfer",
    "another out folder": "another --out",
}


def cli_message(message: str) -> str:
    """``message`` with every API argument it names replaced by its command-line flag."""
    for argument, flag in ARGUMENT_FLAGS.items():
        message = message.replace(argument, flag)
    return message
