"""Attempt notes in the real Redis: what a replica that stopped mid-batch leaves for the next owner."""

from __future__ import annotations

import logging
import secrets

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from joey_core.kafka import ConsumedRecord
from joey_engine.attempts import AttemptNotes
from joey_engine.settings import EngineSettings


def records(partition: int, *offsets: int) -> list[ConsumedRecord]:
    return [ConsumedRecord("joey.w.p.inputs", partition, offset, None, b"{}") for offset in offsets]


def notes(client: redis.Redis, settings: EngineSettings, group: str) -> AttemptNotes:
    return AttemptNotes(client, settings.redis_prefix, group, settings.attempt_notes_ttl_s)


def test_a_batch_that_never_ended_is_found_by_the_next_owner(
    redis_client: redis.Redis, engine_settings: EngineSettings
) -> None:
    group = f"g-{secrets.token_hex(4)}"
    batch = records(0, 10, 11, 12) + records(3, 4)
    first = notes(redis_client, engine_settings, group)
    assert first.tried(batch) == {}
    first.begin(batch, 1)
    # The replica dies here. Its successor polls from the last commit, and further.
    later = records(0, 11, 12, 13) + records(3, 4, 5) + records(1, 11)
    second = notes(redis_client, engine_settings, group)
    assert second.tried(later) == {0: 1, 1: 1, 3: 1}
    second.begin(later[:1], 2)
    assert second.tried(later) == {0: 2, 3: 1}, "a record tried alone narrows its partition's note to itself"
    second.end(later[:1])
    assert second.tried(later) == {3: 1}
    second.end(later[3:4])
    assert second.tried(later) == {3: 1}, "a note another replica wrote is not this one's to end"
    second.begin(later[3:4], 2)
    second.end(later[3:4])
    assert second.tried(later) == {}
    assert notes(redis_client, engine_settings, "another-group").tried(batch) == {}


def test_a_batch_that_ended_leaves_nothing(
    redis_client: redis.Redis, engine_settings: EngineSettings
) -> None:
    group = f"g-{secrets.token_hex(4)}"
    batch = records(2, 1, 2)
    keeper = notes(redis_client, engine_settings, group)
    keeper.begin(batch, 1)
    key = f"{engine_settings.redis_prefix}:attempts:{group}"
    assert 0 < redis_client.pttl(key) <= engine_settings.attempt_notes_ttl_s * 1000, "notes expire"
    keeper.end(batch)
    assert keeper.tried(batch) == {}
    assert not redis_client.exists(f"{engine_settings.redis_prefix}:attempts:{group}")


def test_a_malformed_note_is_ignored(redis_client: redis.Redis, engine_settings: EngineSettings) -> None:
    group = f"g-{secrets.token_hex(4)}"
    redis_client.hset(f"{engine_settings.redis_prefix}:attempts:{group}", "joey.w.p.inputs:0", "garbage")
    assert notes(redis_client, engine_settings, group).tried(records(0, 1)) == {}


def test_without_redis_records_run_without_notes(
    engine_settings: EngineSettings, caplog: pytest.LogCaptureFixture
) -> None:
    # No retries: redis-py's default retries a refused connection with backoff, seconds on every call;
    # what is under test is how the notes live with the error, not the client's retry policy.
    gone = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    keeper = AttemptNotes(gone, engine_settings.redis_prefix, "g", engine_settings.attempt_notes_ttl_s)
    with caplog.at_level(logging.WARNING, logger="joey_engine.attempts"):
        for _ in range(3):
            keeper.begin(records(0, 1), 1)
            assert keeper.tried(records(0, 1)) == {}
            keeper.end(records(0, 1))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, "an outage is reported once, not on every batch"


def test_a_replica_that_lost_its_partition_does_not_end_its_successors_note(
    redis_client: redis.Redis, engine_settings: EngineSettings
) -> None:
    group = f"g-{secrets.token_hex(4)}"
    batch = records(0, 7, 8)
    old, new = notes(redis_client, engine_settings, group), notes(redis_client, engine_settings, group)
    old.begin(batch, 1)
    new.begin(batch, 2)  # the partition moved while the old owner was still running the batch
    old.end(batch)
    assert new.tried(batch) == {0: 2, 1: 2}, "the successor's note survives"
    new.end(batch)
    assert new.tried(batch) == {}


def test_start_notes_a_batch_and_ends_the_committed_one_before_it_in_one_call(
    redis_client: redis.Redis, engine_settings: EngineSettings
) -> None:
    group = f"g-{secrets.token_hex(4)}"
    key = f"{engine_settings.redis_prefix}:attempts:{group}"
    keeper = notes(redis_client, engine_settings, group)
    first = records(0, 1, 2) + records(1, 7)
    assert keeper.start(first) == {}
    assert keeper.tried(first) == {0: 1, 1: 1, 2: 1}, "started: noted as tried once"
    assert 0 < redis_client.pttl(key) <= engine_settings.attempt_notes_ttl_s * 1000, "notes expire"
    keeper.end(first, later=True)
    assert keeper.tried(first) == {0: 1, 1: 1, 2: 1}, "a committed batch's notes wait for the next call"
    second = records(0, 3, 4)
    assert keeper.start(second) == {}
    assert redis_client.hgetall(key) == {b"joey.w.p.inputs:0": b"3:4:1"}, "partition 1's note went with it"
    keeper.end(second, later=True)
    keeper.flush()
    assert not redis_client.exists(key)


def test_start_finds_what_a_stopped_replica_left_and_notes_nothing(
    redis_client: redis.Redis, engine_settings: EngineSettings
) -> None:
    group = f"g-{secrets.token_hex(4)}"
    dead = notes(redis_client, engine_settings, group)
    dead.begin(records(0, 5, 6), 1)
    successor = notes(redis_client, engine_settings, group)
    assert successor.start(records(0, 6, 7)) == {0: 1}
    assert successor.tried(records(0, 6, 7)) == {0: 1}, "left for the one-at-a-time run to note"
    # A note of other offsets (the dead replica's batch was committed after all) is replaced.
    assert successor.start(records(0, 8, 9)) == {}
    assert successor.tried(records(0, 8, 9)) == {0: 1, 1: 1}
