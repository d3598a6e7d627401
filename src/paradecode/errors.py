"""User-facing errors.

Every problem a user can cause (a bad path, a bad option, an empty prompt) is
raised as a :class:`UserError` carrying one line that names the problem and
the fix. The CLI prints that line and exits non-zero; the server turns it into
an error object. Anything else is a bug and may show a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave us, with a one-line fix."""

    def __init__(self, problem: str, fix: str | None = None, *, field: str | None = None, status: int = 400):
        self.problem = problem
        self.fix = fix
        self.field = field
        self.status = status            # the server's HTTP status for it (404: something not served here)
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.problem} — {self.fix}" if self.fix else self.problem
