"""A notebook's stated results, checked against the run's own numbers.

Where a notebook's Markdown says what the figure above shows ("the posterior mean beats the
zero-filled image", "MMPS leads"), the next cell checks it with [`Claims`][] on this run's
numbers and prints whether it holds, so that a reader never meets a claim the figure
contradicts without being told: a small run may well not show what the paper's scale does.
The verdicts go into `metrics.json` (`claims`).
"""

__all__ = ["Claims"]


class Claims:
    """The claims a notebook checked, in order: `{claim: {"holds": bool, "evidence": str}}`."""

    def __init__(self):
        self.results: dict[str, dict] = {}

    def check(self, claim: str, holds, evidence: str) -> None:
        """Records and prints whether `claim` holds in this run, with the numbers behind it
        (`results[claim]["holds"]` keeps the verdict)."""
        holds = bool(holds)
        self.results[claim] = {"holds": holds, "evidence": evidence}
        verdict = "holds" if holds else "does NOT hold in this run"
        print(f"{'✓' if holds else '✗'} {claim}: {verdict} ({evidence})")

    def summary(self) -> str:
        """One line: how many of the claims hold."""
        held = sum(r["holds"] for r in self.results.values())
        return f"{held} of {len(self.results)} claims hold in this run"
