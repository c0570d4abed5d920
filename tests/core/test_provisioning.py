"""Provisioned concurrency as data: a provisioned environment that leaves the pool is replaced (at once after a loss,
after a doubling, capped backoff while Init keeps failing, the backoff reset by a successful Init), an on-demand one
is not, and nothing is replaced once the pool closes. No clock, no event loop."""

from __future__ import annotations

from lambdabox.core.batching import Backoff
from lambdabox.core.provisioning import REPLACEMENT_BACKOFF, Provisioning, Replace

NOW = 1_000.0


def failed_start(policy: Provisioning, now: float = NOW) -> Replace | None:
    return policy.left(now, provisioned=True, initialized=False)


def test_a_lost_provisioned_environment_is_replaced_at_once() -> None:
    policy = Provisioning()
    assert policy.left(NOW, provisioned=True, initialized=True) == Replace(NOW, 0.0)
    assert policy.left(NOW + 5, provisioned=True, initialized=True) == Replace(NOW + 5, 0.0)
    assert policy.failures == 0


def test_an_on_demand_environment_is_not_replaced() -> None:
    policy = Provisioning()
    assert policy.left(NOW, provisioned=False, initialized=True) is None
    assert policy.left(NOW, provisioned=False, initialized=False) is None
    assert policy.failures == 0  # an on-demand Init failure does not slow provisioned replacements


def test_replacements_after_consecutive_failures_back_off_doubling_up_to_the_cap() -> None:
    policy = Provisioning()
    assert policy.backoff is REPLACEMENT_BACKOFF
    delays = [decision.delay_s for _ in range(9) if (decision := failed_start(policy)) is not None]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert failed_start(policy, NOW + 7) == Replace(NOW + 67, 60.0)  # due at now + delay, on the caller's clock


def test_a_short_backoff_for_tests() -> None:
    short = Provisioning(Backoff(first_s=0.05, cap_s=0.2))
    assert [failed_start(short) for _ in range(4)] == [
        Replace(NOW + 0.05, 0.05),
        Replace(NOW + 0.1, 0.1),
        Replace(NOW + 0.2, 0.2),
        Replace(NOW + 0.2, 0.2),
    ]


def test_a_successful_init_resets_the_backoff() -> None:
    policy = Provisioning()
    failed_start(policy)
    failed_start(policy)
    assert failed_start(policy) == Replace(NOW + 4, 4.0)
    policy.initialized()
    assert failed_start(policy) == Replace(NOW + 1, 1.0)


def test_a_loss_while_init_keeps_failing_waits_for_the_backoff_too() -> None:
    policy = Provisioning()
    failed_start(policy)
    failed_start(policy)  # another provisioned environment's Init keeps failing
    assert policy.left(NOW, provisioned=True, initialized=True) == Replace(NOW + 2, 2.0)
    assert policy.failures == 2  # a loss is not a failure of Init


def test_nothing_is_replaced_once_the_pool_closes() -> None:
    policy = Provisioning()
    policy.close()
    assert policy.left(NOW, provisioned=True, initialized=True) is None
    assert failed_start(policy) is None
    assert policy.failures == 0
