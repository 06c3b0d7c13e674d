"""The one exception users meet for bad input: :class:`PolicyError`."""

from __future__ import annotations


class PolicyError(ValueError):
    """A policy, a model or a request that momentkv cannot honour.

    Raised before anything on the model changes. ``problems`` lists every problem found (a policy file
    reports all its errors at once); ``str(error)`` shows them one per line.
    """

    def __init__(self, message: str | list[str]):
        problems = [message] if isinstance(message, str) else list(message)
        self.problems = problems
        super().__init__("\n".join(problems))
