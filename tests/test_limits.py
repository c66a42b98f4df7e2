"""The per-connection message rate: a token bucket and its refusal streak."""

from __future__ import annotations

import trio

from netra.limits import TokenBucket


async def test_bucket_gives_its_burst_then_refills_at_its_rate(autojump_clock):
    bucket = TokenBucket(rate=10.0, burst=3)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after_ms() == 100
    await trio.sleep(0.1)
    assert bucket.take() and not bucket.take()


async def test_refusal_streak_counts_in_a_row_and_resets_on_an_accepted_message(autojump_clock):
    bucket = TokenBucket(rate=10.0, burst=1)
    assert bucket.take()
    for n in range(1, 6):
        assert not bucket.take()
        assert bucket.refusals == n
    await trio.sleep(0.1)  # one token back: the next message is accepted
    assert bucket.take() and bucket.refusals == 0
    assert not bucket.take() and bucket.refusals == 1


async def test_the_streak_does_not_decay_while_the_client_keeps_sending(autojump_clock):
    """Refusals spread out in time still count in a row: only an accepted
    message ends the streak (the protocol document's rule)."""
    bucket = TokenBucket(rate=1.0, burst=1)
    assert bucket.take()
    for _ in range(4):
        await trio.sleep(0.2)  # a refusal every 0.2 s: never enough for a token
        assert not bucket.take()
    assert bucket.refusals == 4
