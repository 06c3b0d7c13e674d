"""The one exception users meet for bad input: :class:`PolicyError`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a policy: where it is and what was expected.

    ``origin`` is the file (or ``<dict>``, ``<text>``), ``line`` the 1-based YAML line (``None`` when unknown),
    ``path`` the field path such as ``decode.scorers[1].alpha`` (empty for the whole policy).
    """

    message: str
    origin: str = ""
    line: int | None = None
    path: str = ""

    def __str__(self) -> str:
        where = self.origin + (f":{self.line}" if self.origin and self.line is not None else "")
        if self.path:
            where = f"{where} {self.path}" if where else self.path
        return f"{where}: {self.message}" if where else self.message


class PolicyError(ValueError):
    """A policy, a model or a request that momentkv cannot honour.

    Raised before anything on the model changes. ``problems`` lists every problem found as text (a policy
    file reports all its errors at once), e.g. ``moment.yaml:7 decode.scorers[1].alpha: must be in (0, 1],
    got 1.5``; ``details`` holds the same as :class:`Problem` records (origin, line, path, message);
    ``str(error)`` shows the problems one per line.
    """

    def __init__(self, message: str | Problem | list[str | Problem]):
        items = [message] if isinstance(message, (str, Problem)) else list(message)
        self.details: list[Problem] = [p if isinstance(p, Problem) else Problem(str(p)) for p in items]
        self.problems: list[str] = [str(p) for p in self.details]
        super().__init__("\n".join(self.problems))
