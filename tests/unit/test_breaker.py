"""The endpoint circuit breaker: its state machine on an injected clock, and rows of the endpoint
exchange waiting out an outage (``MockTransport`` and a fake clock: no sleeps, no wall-clock).

Each test names the mutation of ``ai_query/limits/breaker.py`` or ``ai_query/_client.py`` it catches.
"""

import asyncio
import heapq
import itertools

import pytest

from ai_query import (
    AIQueryClient, ConnectFailedError, EndpointOutageError, EndpointRegistry, EndpointTimeoutError, RateLimitedError,
    RetryableEndpointError,
)
from ai_query.limits.breaker import CircuitBreaker, is_outage
from ai_query.transport import MockTransport

from .fakes import FakeClock, chat_body, json_response


def breaker(clock, **kw):
    return CircuitBreaker("ep", clock=clock, sleep=clock.sleep, **{"outage_wait_s": 60.0, **kw})


def test_opens_after_threshold_outage_signs_in_a_row_and_any_answer_ends_the_streak():
    # mutations caught: `streak >= threshold` -> `streak > threshold`; answered() not resetting the streak
    # and failed() charging a streak's failures to their rows once it spans two rows (`or len(...) >= 2` dropped)
    clock = FakeClock()
    b = breaker(clock, threshold=5)
    assert [b.failed("refused", row=1) for _ in range(4)] == [False] * 4  # one row's own streak stays its own
    b.answered()  # a 500 or a 429 is an answer too: the endpoint is there
    assert [b.failed("refused", row=r) for r in (1, 2, 1, 3)] == [False, True, True, True]  # spans rows: the endpoint's
    assert b.state == "closed" and b.decide() == ("go", 0.0)
    assert b.failed("refused") is True and b.state == "open" and b.opened == 1


def test_open_waits_then_one_probe_its_answer_closes_its_failure_doubles_the_pause():
    # mutations caught: probing before probe_at; a second caller probing while one is out;
    # the pause not doubling on a failed probe, or not capped
    clock = FakeClock()
    b = breaker(clock, threshold=1, first_probe_s=0.25, max_probe_interval_s=1.0)
    b.failed("refused")
    assert b.decide() == ("wait", 0.25)
    clock.now += 0.25
    assert b.decide() == ("probe", 0.0)
    assert asyncio.run(b.admit()) is True and b.state == "half_open"
    assert b.decide()[0] == "wait"  # the others wait for the probe's outcome
    pauses = []
    for _ in range(4):
        b.failed("refused", probe=True)
        action, pause = b.decide()
        assert action == "wait"
        pauses.append(pause)
        clock.now += pause
        assert asyncio.run(b.admit()) is True
    assert pauses == [0.5, 1.0, 1.0, 1.0]
    b.answered()
    assert b.state == "closed" and b.streak == 0 and b.down_since is None and b.decide() == ("go", 0.0)
    b.failed("refused")  # a new outage starts from the first pause again
    assert b.decide() == ("wait", 0.25)


def test_a_failure_of_a_request_sent_before_the_breaker_opened_does_not_count_as_the_probe():
    # mutation caught: failed() reopening on any failure while half-open (the probe's answer would be ignored)
    clock = FakeClock()
    b = breaker(clock, threshold=1)
    b.failed("refused")
    clock.now += 1
    assert asyncio.run(b.admit()) is True
    assert b.failed("reset of an older request") is True and b.state == "half_open"


def test_an_answer_to_a_request_sent_before_the_outage_began_neither_closes_the_breaker_nor_clears_the_streaks_rows():
    # mutations caught: answered() ignoring sent_at (the stale answer closes the breaker, or clears
    # the rows so row 1's next failure is charged to it again); a stale answer not ending the count
    # towards opening (a half-broken endpoint's stragglers would open it by bad luck)
    clock = FakeClock()
    b = breaker(clock, threshold=3)
    before = clock.now
    clock.now += 1
    assert b.failed("refused", row=1) is False  # charged to row 1: its own, so far
    b.answered(sent_at=before)
    assert b.streak == 0 and b.down_since == before + 1
    assert b.failed("refused", row=1) is False and b.failed("refused", row=2) is True and b.state == "closed"
    assert b.failed("refused", row=3) is True and b.state == "open"
    b.answered(sent_at=before)  # a straggler: the endpoint was there before it went down
    assert b.state == "open" and b.down_since == before + 1
    clock.now += 1
    b.answered(sent_at=clock.now - 0.5)  # sent after the outage began: the endpoint is back
    assert b.state == "closed" and b.streak == 0 and b.down_since is None


def test_rows_give_up_after_outage_wait_s_from_the_outage_start_with_a_message_saying_how_to_resume():
    # mutations caught: the wait counted from the row's arrival, not the outage's first failure;
    # a due probe not going first; the message losing the duration or the resume command
    clock = FakeClock()
    b = breaker(clock, threshold=2, max_probe_interval_s=100.0)
    b.failed("first")
    clock.now += 10
    b.failed("connection error calling 'ep': refused")
    clock.now += 49.9
    action, wait = b.decide()
    assert action == "wait" and wait == pytest.approx(0.1) or action == "probe"
    b.probe_at = clock.now + 100  # no probe due for a long time
    clock.now += 0.1
    assert b.decide() == ("give_up", 0.0)
    with pytest.raises(EndpointOutageError) as caught:
        asyncio.run(b.admit())
    message = str(caught.value)
    assert "endpoint 'ep' has not answered for 60 s" in message
    assert "last failure: connection error calling 'ep': refused" in message
    assert "client_config.outage_wait_s (60 s)" in message and "ai-query run <job.toml> --retry-failed" in message
    assert caught.value.status_code == 503
    b.probe_at = clock.now  # the endpoint may be back: a due probe goes even past the wait
    assert b.decide() == ("probe", 0.0)


def test_a_row_with_its_own_deadline_gives_up_then_and_says_so():
    # mutation caught: give_up_at ignored (a served request would wait outage_wait_s, past its timeout)
    clock = FakeClock()
    b = breaker(clock, threshold=1, max_probe_interval_s=100.0)
    b.failed("refused")
    b.probe_at = clock.now + 100
    deadline = clock.now + 5
    assert b.decide(deadline) == ("wait", 5.0)
    with pytest.raises(EndpointOutageError, match="the request waited as long as it may \\(its request timeout\\)"):
        asyncio.run(b.admit(deadline, waited_for="its request timeout"))
    assert clock.now == deadline


def test_an_abandoned_probe_lets_the_next_caller_probe_at_once():
    # mutation caught: probe_abandoned() doing nothing (half-open forever: every row waits out outage_wait_s)
    clock = FakeClock()
    b = breaker(clock, threshold=1)
    b.failed("refused")
    clock.now += 1
    assert asyncio.run(b.admit()) is True
    b.probe_abandoned()
    assert b.decide() == ("probe", 0.0)


def test_waiters_wake_when_the_probe_closes_the_breaker():
    # mutation caught: answered() not waking the waiters (they would sleep to the next probe time)
    clock = FakeClock()
    b = CircuitBreaker("ep", clock=clock, sleep=lambda s: asyncio.Event().wait())  # time stands still
    b.failed("refused")
    b.failed("refused")
    b.failed("refused")
    b.failed("refused")
    b.failed("refused")

    async def scenario():
        clock.now += 0.25
        assert await b.admit() is True  # this caller probes
        waiter = asyncio.ensure_future(b.admit())
        for _ in range(3):
            await asyncio.sleep(0)
        assert not waiter.done()
        b.answered()
        for _ in range(3):
            await asyncio.sleep(0)
        assert waiter.done()
        return waiter.result()

    assert asyncio.run(scenario()) is False and b.state == "closed"


@pytest.mark.parametrize("failure, outage", [
    (RetryableEndpointError("connection error calling 'ep': refused"), True),
    (RetryableEndpointError("HTTP 502", status_code=502), True),
    (RetryableEndpointError("HTTP 503", status_code=503), True),
    (RetryableEndpointError("HTTP 504", status_code=504), True),
    (RetryableEndpointError("HTTP 500", status_code=500), False),
    (RetryableEndpointError("HTTP 200 malformed", status_code=200), False),
    (RateLimitedError("HTTP 503 Retry-After", status_code=503, retry_after=1.0), False),
    (EndpointTimeoutError("timed out"), False),
])
def test_which_failures_are_outage_signs(failure, outage):
    # mutation caught: 500s counted as an outage (a half-broken endpoint would pause instead of meeting the retry budget)
    assert is_outage(failure) is outage


# -- the endpoint exchange ----------------------------------------------------------------------

def endpoint(**client):
    return EndpointRegistry.from_data({
        "name": "q",
        "config": {"served_entities": [{"name": "m", "external_model": {
            "name": "m", "provider": "openai", "task": "llm/v1/chat",
            "openai_config": {"openai_api_key_plaintext": "k", "openai_api_base": "http://q.test/v1"}}}]},
        "client_config": {"initial_concurrency": 16, "max_concurrency": 16, "max_attempts": 3, **client},
    })


class VirtualClock:
    """Time that moves to the next sleeper's deadline once every task is idle, so concurrent
    sleeps overlap as in real time (``FakeClock`` adds them up, one after another)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._timers: list = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + max(0.0, seconds), next(self._seq), future))
        await future

    def run(self, coro):
        async def drive():
            task = asyncio.ensure_future(coro)
            while not task.done():
                for _ in range(20):
                    await asyncio.sleep(0)
                while self._timers and self._timers[0][2].done():  # cancelled timers
                    heapq.heappop(self._timers)
                if self._timers and not task.done():
                    deadline, _, future = heapq.heappop(self._timers)
                    self.now = max(self.now, deadline)
                    future.set_result(None)
            return task.result()

        return asyncio.run(drive())


class Provider:
    """Answers until it has served ``down_after`` rows, then refuses connections (or answers
    ``down_status``) until the fake clock passes ``down_for`` seconds more."""

    def __init__(self, clock, down_after, down_for, down_status=None):
        self.clock, self.down_after, self.down_for, self.down_status = clock, down_after, down_for, down_status
        self.down_at = None
        self.served = 0
        self.refused = 0

    async def __call__(self, request):
        await asyncio.sleep(0)  # let the queued rows run ahead, as real I/O does
        if self.down_at is None and self.served >= self.down_after:
            self.down_at = self.clock()
        if self.down_at is not None and self.clock() < self.down_at + self.down_for:
            self.refused += 1
            if self.down_status is not None:
                return json_response(self.down_status, {"error": "no healthy upstream"})
            raise ConnectFailedError("cannot connect to http://q.test: Connection refused")
        self.served += 1
        return json_response(200, chat_body("ok"))


@pytest.mark.parametrize("rows, down_after", [(400, 100), (24, 8)])  # (24, 8): every row left failed once already
@pytest.mark.parametrize("down_status", [None, 502])
def test_rows_wait_out_an_outage_instead_of_spending_attempts_and_the_retry_budget(down_status, rows, down_after):
    # mutations caught: the client not converting failures met while the breaker is open
    # (`endpoints_fault = False` in _client.py) or stop_for_endpoint counting them: a row that
    # probes twice has spent its 2 attempts and fails; not re-checking the breaker after a slot
    # is taken: the rows queued for a slot when it opened are all sent (the bound on refused)
    clock = VirtualClock()
    provider = Provider(clock, down_after=down_after, down_for=60.0, down_status=down_status)
    client = AIQueryClient(endpoint(max_attempts=2), transport=MockTransport(provider), clock=clock, sleep=clock.sleep)
    results = clock.run(client.amap("q", [f"row {i}" for i in range(rows)]))
    assert [r.error for r in results if not r.ok] == []
    assert provider.served == rows
    ep = client.endpoint("q")
    breaker = ep.routes[0].breaker
    assert breaker.opened == 1 and breaker.state == "closed" and breaker.probes >= 10  # many probes failed
    # while it was down: the requests in flight (16), before the breaker opened the retries of the first
    # failures and the rows started in their slots (< threshold each), then one probe per pause
    assert provider.refused <= 16 + 2 * breaker.threshold + breaker.probes
    assert breaker.probes < 120 / breaker.first_probe_s


def test_rows_fail_with_the_outage_message_once_it_outlasts_outage_wait_s_and_later_rows_are_not_sent():
    # mutation caught: stop_for_endpoint / the breaker never giving up (rows would wait for ever)
    clock = VirtualClock()
    provider = Provider(clock, down_after=50, down_for=10_000.0)
    client = AIQueryClient(endpoint(outage_wait_s=30), transport=MockTransport(provider), clock=clock, sleep=clock.sleep)
    results = clock.run(client.amap("q", [f"row {i}" for i in range(200)]))
    failed = [r for r in results if not r.ok]
    assert len(failed) == 150 and sum(r.ok for r in results) == 50
    assert all("has not answered for" in r.error and "outage_wait_s (30 s)" in r.error and "--retry-failed" in r.error
               and r.status_code == 503 for r in failed)
    sent_before = provider.refused
    [late] = clock.run(client.amap("q", ["a row after the wait"]))
    # past the wait, a new row fails without being sent, unless it is the probe that is due
    assert not late.ok and provider.refused - sent_before <= 1


def test_outage_wait_s_is_checked_at_construction():
    from ai_query import ConfigError

    with pytest.raises(ConfigError, match=r"client_config.outage_wait_s must be >= 0, got -1"):
        endpoint(outage_wait_s=-1)


class DrainingProvider:
    """Goes down after ``down_after`` requests as a server shutting down gracefully does: new
    connections are refused at once, while the requests it had accepted still get their answers,
    each after its own latency (so the answers straggle in after the first refusals)."""

    def __init__(self, clock, down_after):
        self.clock, self.down_after = clock, down_after
        self.accepted = 0
        self.served = 0

    async def __call__(self, request):
        if self.accepted >= self.down_after:
            raise ConnectFailedError("cannot connect to http://q.test: Connection refused")
        self.accepted += 1
        await self.clock.sleep(0.05 + (self.accepted % 8) * 0.04)
        self.served += 1
        return json_response(200, chat_body("ok"))


def test_answers_to_requests_sent_before_an_outage_do_not_end_it_and_every_row_left_fails_with_the_outage_message():
    # the CI failure of stop 25: the answers of a shutting-down server's last accepted requests each
    # closed the breaker again, a row first to fail after two of them was charged both failures and
    # failed with "connection error ... gave up" instead of waiting for the endpoint.
    # mutation caught: answered() ignoring sent_at (an answer to a request sent before the outage
    # began closing the breaker or clearing the streak's rows)
    clock = VirtualClock()
    provider = DrainingProvider(clock, down_after=60)
    client = AIQueryClient(endpoint(max_attempts=2, outage_wait_s=5), transport=MockTransport(provider), clock=clock,
                           sleep=clock.sleep)
    results = clock.run(client.amap("q", [f"row {i}" for i in range(100)]))
    failed = [r for r in results if not r.ok]
    assert sum(r.ok for r in results) == provider.served == 60 and len(failed) == 40
    assert [r.error for r in failed if "has not answered for" not in r.error] == []
