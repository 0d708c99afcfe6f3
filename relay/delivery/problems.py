"""The ChurnZero problems the operator must act on, as one thread's sends meet them.

An answer that cannot be ChurnZero's (`misconfigured`: a redirect, a proxy's page) and a
host that cannot be reached (`dns`, `tls`, `refused`, `connect_timeout`, named by
relay.delivery.churnzero) are recorded in Redis (relay.state.status), where `relay
status`, the admin page and `/metrics` (`relay_churnzero_problem{kind}`) show them with
the host, the error and a hint; the first 2xx afterwards clears them.
"""

from __future__ import annotations

import contextlib
from typing import Any

import structlog

from relay import retry
from relay.delivery.churnzero import ChurnZeroClient, diagnosis, hint
from relay.state import broker, status

log = structlog.get_logger("relay.delivery")


class Problems:
    """Records the problems one thread's requests meet, and clears them on a success."""

    def __init__(self, r: Any, client: ChurnZeroClient) -> None:
        self._redis = r
        self._client = client
        # A problem may be recorded that no success has cleared yet: by this thread, or
        # by a worker before a restart (the URL fixed), whose record the first success
        # of each new thread clears.
        self._shown = True

    def seen(self, outcome: retry.Outcome) -> None:
        """Take note of one request's outcome."""
        if outcome.misconfigured is not None:
            # The operator must act: the events wait (paused, retried), and status says why.
            log.error(
                "churnzero_misconfigured", problem=outcome.misconfigured,
                status=outcome.status, url=self._client.url,
            )  # fmt: skip
            self._record("misconfigured", outcome.misconfigured, url=self._client.url)
        elif outcome.unreachable is not None:
            kind, host = outcome.unreachable, self._client.host
            found = diagnosis(kind, self._client.answered)
            self._record(
                kind, f"{found}: {outcome.excerpt}", host=host, error=outcome.excerpt,
                hint=hint(kind, host), diagnosis=found,
            )  # fmt: skip
        elif self._shown and outcome.kind is retry.Kind.SUCCESS:
            with contextlib.suppress(*broker.QUEUE_ERRORS):  # cleared on the next success
                status.clear_churnzero_problems(self._redis)
                self._shown = False

    def _record(self, kind: str, problem: str, **detail: str) -> None:
        # Each failed request refreshes it: the throttle keeps them few (a probe at a
        # time once the outage pause trips).
        with contextlib.suppress(*broker.QUEUE_ERRORS):  # the log line says it anyway
            status.record_churnzero_problem(self._redis, kind, problem, detail)
            self._shown = True
