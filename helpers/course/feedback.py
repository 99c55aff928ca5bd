"""What an exercise check says to a student: right, or not yet and why."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Feedback", "expect"]


@dataclass(frozen=True)
class Feedback:
    """The outcome of one exercise check.

    Attributes
    ----------
    ok : bool
        True when the answer is right.
    message : str
        What was right, or what is not yet right and a hint towards it.
    """

    ok: bool
    message: str

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return f"{'Right' if self.ok else 'Not yet'}: {self.message}"

    def _repr_markdown_(self) -> str:
        return f"{'✅ **Right**' if self.ok else '❌ **Not yet**'}: {self.message}"


def expect(condition: bool, right: str, not_yet: str) -> Feedback:
    """A :class:`Feedback` from one condition.

    Parameters
    ----------
    condition : bool
        Whether the student's answer passes.
    right : str
        Said when it does (what the student has shown).
    not_yet : str
        Said when it does not (what is wrong, and a hint).

    Returns
    -------
    Feedback
    """
    return Feedback(bool(condition), right if condition else not_yet)
