"""Where a worker resumes when Redis is behind Kafka (``streams/worker/resume.py``)."""

from __future__ import annotations

import pytest

from streams.worker.resume import RedisBehindKafka, Rewind, plan_resume

B = "events.browse"


def test_in_step_or_without_commits_nothing_is_rewound() -> None:
    committed = {(B, 0): 100, (B, 1): None, (B, 2): 0, (B, 3): 51}
    marks = {(B, 0): 99, (B, 3): 50}
    assert plan_resume(committed, marks) == []


def test_a_watermark_behind_the_commit_rewinds_to_just_after_it() -> None:
    [rewind] = plan_resume({(B, 0): 120, (B, 1): 50}, {(B, 0): 99, (B, 1): 49})
    assert rewind == Rewind(B, 0, committed=120, watermark=99)
    assert rewind.to == 100


def test_a_partition_without_a_watermark_is_read_from_the_beginning() -> None:
    [rewind] = plan_resume({(B, 0): 120, (B, 1): 7}, {(B, 0): 119})
    assert (rewind.partition, rewind.watermark, rewind.to) == (1, None, None)


def test_no_watermark_at_all_stops_and_says_what_to_do() -> None:
    with pytest.raises(RedisBehindKafka) as raised:
        plan_resume({(B, 0): 120, (B, 1): None}, {})
    message = str(raised.value)
    assert f"{B}[0] committed at 120" in message
    assert "--reset-offsets" in message and "HSET" in message
    assert f"{B}[1]" not in message


def test_a_fresh_deployment_starts_without_complaint() -> None:
    assert plan_resume({(B, 0): None, (B, 1): None}, {}) == []
