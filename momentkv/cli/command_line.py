"""The command line a run prints beside its results, so that the printed command reruns the same run.

``main()`` keeps the words it parsed on the arguments (``args.argv``); a report quotes them as they were typed,
so no command rebuilds its own line from its options (where a new option could be forgotten).
"""

from __future__ import annotations

import shlex


def typed_command(args) -> str:
    """``momentkv`` and the words after it, quoted for a shell; a call that did not come through ``main()``
    (a namespace built in Python) says so instead."""
    words = getattr(args, "argv", None)
    if words is None:
        return f"momentkv {getattr(args, 'command', None) or ''} (called from Python, not from a command line)"
    return shlex.join(["momentkv", *words])
