"""The circuit breaker: an endpoint that stopped answering pauses as a whole, probes, and resumes.

Without it, an outage (the server restarting, a gateway whose backend is gone) is met row by row:
every row spends its attempts and the endpoint's retry budget within seconds, and a job commits
its rows as errors (issue 13: 1,800 of 3,000 rows failed 6.8 s into a 15-s outage). The breaker
tells an outage from bad luck and turns it into waiting:

- **closed**: attempts go. ``threshold`` attempts in a row that met a sign of an outage (no
  connection, a broken connection, 502/503/504 without Retry-After; see ``is_outage``) with no
  answer in between open it. An answer of any kind (even a 500 or a 429: the endpoint is there)
  ends the streak; a timeout says nothing either way (a sign of load, for the limiter). Once the
  streak spans two rows, its further failures are not charged to their rows (they are retried
  after the usual backoff): found in the job test, where with 4 rows in flight per worker and
  ``max_attempts`` 2 a row retried at once spent both attempts on refused connections before the
  breaker opened. A streak of one row's failures alone (a prompt that resets the connection)
  stays that row's until the breaker opens.
- **open**: no attempt goes; rows wait in ``admit``. A failure met now is the endpoint's, not the
  row's: the client retries it without counting it towards ``max_attempts`` or spending the
  retry budget. After a pause (``first_probe_s``, doubling up to ``max_probe_interval_s`` while
  the probes fail) one caller goes as the probe.
- **half-open**: the probe is out, everyone else still waits. Its answer closes the breaker and
  wakes every waiter; its failure opens it again for a longer pause. Any answer from a request
  that was in flight closes it too, so a half-broken endpoint (which opens it now and then by a
  run of bad luck) pauses only until its next answer, unless that request was sent before the
  outage began: a server shutting down still answers what it had accepted (see ``answered``).

A row waits until the endpoint has been down ``outage_wait_s`` (from the first failure of the
outage) or until its own deadline (a served request's timeout), then fails with
``EndpointOutageError``, which says for how long the endpoint was down and how to resume. The
retry budget still guards against an endpoint that answers, but badly (500s): those close the
breaker and spend the budget as before.

One breaker per served entity per worker process; workers do not share it. Each worker sees the
outage in its own first few failures (a shared breaker would add a round trip to the driver's
broker on every attempt and would stall every worker on one lost heartbeat), and while it is open
each worker sends one probe per pause, so N workers send at most N requests per pause to a down
endpoint. Time comes from an injected ``clock`` and ``sleep`` (tests use a fake clock).
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Literal

from .._logging import Throttled, get_logger
from .._errors import EndpointOutageError, EndpointTimeoutError, RateLimitedError, ReplicaUnavailableError, RetryableEndpointError

State = Literal["closed", "open", "half_open"]
_throttled = Throttled(get_logger("ai_query.limits"))
"""The breaker opening and closing, at INFO: at most one line per endpoint and change every 10 s."""
OUTAGE_STATUSES = frozenset({502, 503, 504})


def is_outage(failure: BaseException | None) -> bool:
    """Whether a failed attempt is a sign that the endpoint is not there: no connection or a
    broken one (``status_code`` None: no HTTP answer), or a gateway's 502/503/504 without
    Retry-After (a 503 with Retry-After is a rate limit)."""
    if not isinstance(failure, RetryableEndpointError):
        return False
    if isinstance(failure, (RateLimitedError, EndpointTimeoutError, ReplicaUnavailableError)):
        return False
    return failure.status_code is None or failure.status_code in OUTAGE_STATUSES


class CircuitBreaker:
    """closed -> open -> half-open probe -> closed, for one endpoint (see the module docstring)."""

    def __init__(
        self,
        name: str,
        *,
        outage_wait_s: float = 300.0,
        threshold: int = 5,
        first_probe_s: float = 0.25,
        max_probe_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.name = name
        self.outage_wait_s = outage_wait_s
        self.threshold = threshold
        self.first_probe_s = first_probe_s
        self.max_probe_interval_s = max_probe_interval_s
        self._clock = clock
        self._sleep = sleep
        self.state: State = "closed"
        self.streak = 0
        """Attempts in a row that met an outage sign, with no answer between them."""
        self._streak_rows: set[int] = set()  # up to 2 rows' keys: does the streak span rows?
        self.down_since: float | None = None
        """Clock reading of the streak's first failure: when the outage began, as far as we know."""
        self.last_failure = ""
        self.probe_at = 0.0
        self.opened = 0
        """Times the breaker opened (for tests and reports)."""
        self.probes = 0
        self._interval = first_probe_s
        self._changed: asyncio.Event | None = None

    # -- outcomes ----------------------------------------------------------------------------
    def answered(self, sent_at: float | None = None) -> None:
        """The endpoint answered (any HTTP answer that is not an outage sign): it is there.

        ``sent_at``: when the answered request was sent. An answer to a request sent before the
        streak's first failure says only that the endpoint was there then: a server shutting down
        answers the requests it had accepted after it stopped taking new connections. Such an
        answer leaves an open breaker open (its probe tells) and, while it is closed, only ends the
        count towards opening it: the rows the streak met stay in it, so their further failures
        are still the endpoint's (found in CI: each straggling answer closed the breaker, and a row
        that was first to fail after two of them was charged both and failed with "gave up")."""
        if sent_at is not None and self.down_since is not None and sent_at < self.down_since:
            if self.state == "closed":
                self.streak = 0
            return
        self.streak = 0
        self._streak_rows.clear()
        self.down_since = None
        if self.state != "closed":
            _throttled.info(("closed", self.name), "endpoint %r answers again: circuit breaker closed, rows go on", self.name,
                            endpoint=self.name, breaker="closed")
            self.state = "closed"
            self._interval = self.first_probe_s
            self._wake()

    def failed(self, error: str, *, probe: bool = False, row: int = 0) -> bool:
        """An attempt of ``row`` (a key of the row) met an outage sign. True if the failure is
        the endpoint's, not the row's (it costs the row no attempt and no budget): the breaker
        is open after it, or the streak spans two rows already."""
        now = self._clock()
        self.streak += 1
        if len(self._streak_rows) < 2:
            self._streak_rows.add(row)
        self.last_failure = error
        if self.down_since is None:
            self.down_since = now
        if self.state == "closed" and self.streak >= self.threshold:
            self.state = "open"
            self.opened += 1
            self._interval = self.first_probe_s
            self.probe_at = now + self._interval
            _throttled.info(("open", self.name), "endpoint %r looks down (%d failures in a row, last: %s): circuit breaker "
                            "open, rows wait for it up to %g s", self.name, self.streak, error, self.outage_wait_s,
                            endpoint=self.name, breaker="open", error=error)
        elif self.state == "half_open" and probe:
            self._reopen(now, longer=True)
        return self.state != "closed" or len(self._streak_rows) >= 2

    def probe_abandoned(self) -> None:
        """The probe ended without an answer or an outage sign (a timeout, a cancelled row): the
        next caller probes at once."""
        if self.state == "half_open":
            self._reopen(self._clock(), longer=False)

    def _reopen(self, now: float, *, longer: bool) -> None:
        if longer:
            self._interval = min(self.max_probe_interval_s, self._interval * 2)
        self.state = "open"
        self.probe_at = now + (self._interval if longer else 0.0)
        self._wake()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # -- admission ---------------------------------------------------------------------------
    def decide(self, give_up_at: float | None = None) -> tuple[str, float]:
        """What a caller does now: ``("go", 0)``, ``("probe", 0)``, ``("wait", seconds)`` or
        ``("give_up", 0)``. A probe that is due goes first even past the wait (the endpoint may be
        back); only then does a row that waited long enough give up."""
        if self.state == "closed":
            return "go", 0.0
        now = self._clock()
        if self.state == "open" and now >= self.probe_at:
            return "probe", 0.0
        assert self.down_since is not None
        limit = self.down_since + self.outage_wait_s
        if give_up_at is not None:
            limit = min(limit, give_up_at)
        if now >= limit:
            return "give_up", 0.0
        until = min(limit, self.probe_at) if self.state == "open" else limit
        return "wait", max(0.0, until - now)

    async def admit(self, give_up_at: float | None = None, waited_for: str = "") -> bool:
        """Wait while the endpoint is down; True if the caller goes as the probe. Raises
        ``EndpointOutageError`` once the endpoint has been down ``outage_wait_s`` or the clock
        reaches ``give_up_at`` (``waited_for`` names that deadline in the message)."""
        while True:
            action, seconds = self.decide(give_up_at)
            if action == "go":
                return False
            if action == "probe":
                self.state = "half_open"
                self.probes += 1
                return True
            if action == "give_up":
                raise EndpointOutageError(self.outage_message(give_up_at, waited_for), status_code=503)
            await self._wait(seconds)

    async def _wait(self, seconds: float) -> None:
        """Until the state changes or ``seconds`` pass, whichever comes first."""
        if self._changed is None:
            self._changed = asyncio.Event()
        changed = asyncio.ensure_future(self._changed.wait())
        timer = asyncio.ensure_future(self._sleep(seconds))
        try:
            await asyncio.wait({changed, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            timer.cancel()

    def outage_message(self, give_up_at: float | None = None, waited_for: str = "") -> str:
        now = self._clock()
        down_for = now - (self.down_since if self.down_since is not None else now)
        began = time.strftime("%H:%M:%S UTC", time.gmtime(time.time() - down_for))
        if give_up_at is not None and now >= give_up_at and down_for < self.outage_wait_s:
            limit = f"the request waited as long as it may ({waited_for or 'its deadline'})"
        else:
            limit = f"longer than client_config.outage_wait_s ({self.outage_wait_s:g} s)"
        return (
            f"endpoint {self.name!r} has not answered for {down_for:.0f} s (down since {began}; last failure: "
            f"{self.last_failure}), {limit}, so the row was not sent again. Once the endpoint answers, resume: "
            f"`ai-query run <job.toml> --retry-failed` for a job, or send the query again; raise "
            f"client_config.outage_wait_s to wait out longer outages"
        )
