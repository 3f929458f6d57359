"""When a recording whose run failed is tried again: after growing delays (by default 1, 2, 5, 15 and
60 minutes, then hourly) until it succeeds or is older than `redrive_max_age_days`; then it is given up
(and its audio kept). An outage of the archive or a sink thus costs a human nothing. No Prefect here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class RedrivePolicy:
    delays_s: Sequence[float]
    max_age: timedelta

    def next_attempt(self, failures: int, arrived: datetime, failed_at: datetime) -> datetime | None:
        """When to run again after the `failures`-th failed attempt (1, 2, ...), or None: give up."""
        if failed_at - arrived >= self.max_age:
            return None
        delay = self.delays_s[min(max(failures, 1), len(self.delays_s)) - 1]
        return failed_at + timedelta(seconds=delay)
