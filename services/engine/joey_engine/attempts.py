"""Which input records were being processed when a replica stopped, kept where its death cannot erase it.

Before running a batch a replica notes, in Redis, the range of offsets it takes from each partition and
how many times those offsets have been tried; a batch that ends (answered, or its delivery failed and it
will be retried) removes its notes: at once, or once its offsets are committed (no owner reads them again)
with the next batch's round trip (:meth:`AttemptNotes.start`). A note left behind means the replica
stopped in the middle: a native crash in a runtime, the kernel's OOM killer, anything that ends the
process. The partition's next owner, whichever replica or engine that is, finds it and runs the noted
records one at a time, each with its own note, so the one that stops the replica is known; once a record
was tried ``max_record_attempts`` times it is dead-lettered instead of being run again. Restarts are
bounded by that count per record.

Notes live in one hash per consumer group (``<prefix>:attempts:<group>``), a field per partition:
``"<first offset>:<last offset>:<attempts>"``. The hash expires ``attempt_notes_ttl_s`` after the last
note was taken, and the registry deletes it with the pipeline. Without Redis a replica runs without
notes (and says so): inference goes on, only a record that kills replicas is then retried until Redis is back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis

from joey_core import topics
from joey_core.kafka import AnyLogger, ConsumedRecord

log = logging.getLogger(__name__)


# Deletes a field only if it still holds the note this replica wrote: a replica that lost its partition
# mid-batch must not erase the note of the replica that took it over.
_END_MINE = """
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return n
"""


# One round trip per batch: ends the notes of batches that ended since (as _END_MINE), reads the notes of
# the batch's partitions, and when there are none notes the batch as tried once. ARGV: the number of
# notes to end, those (field, note) pairs, the TTL in ms, then the batch's (field, note) pairs.
_START = """
local ending = tonumber(ARGV[1])
for i = 2, 2 * ending, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
local first = 2 * ending + 3
local found = {}
local noted = false
for i = first, #ARGV, 2 do
  local note = redis.call('HGET', KEYS[1], ARGV[i])
  found[#found + 1] = note
  noted = noted or note
end
if not noted then
  for i = first, #ARGV, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[first - 1])
end
return found
"""


def _field(record: ConsumedRecord) -> str:
    return f"{record.topic}:{record.partition}"


class AttemptNotes:
    def __init__(
        self, client: redis.Redis, prefix: str, group: str, ttl_s: float, log: AnyLogger = log
    ) -> None:
        self._redis = client
        self._key = topics.attempt_notes_key(prefix, group)
        self._ttl_ms = int(ttl_s * 1000)
        self._log = log
        self._end_mine = client.register_script(_END_MINE)
        self._start = client.register_script(_START)
        self._mine: dict[str, str] = {}
        """The notes this replica wrote and has not ended, by field."""
        self._ending: dict[str, str] = {}
        """Notes of runs that ended whose removal waits for the next call to Redis (``end(later=True)``)."""
        self._down = False
        """Redis failed the last call: the outage was reported, and is not again until it ends."""

    def _failed(self, what: str, exc: redis.RedisError) -> None:
        if not self._down:
            self._down = True
            self._log.warning(
                "cannot %s (a crashing record is not counted until Redis is back): %s", what, exc
            )

    def _reached(self) -> None:
        if self._down:
            self._down = False
            self._log.info("attempt notes written again: Redis is back")

    def tried(self, batch: Sequence[ConsumedRecord]) -> dict[int, int]:
        """How many times each record of ``batch`` was in a run that never ended, by index in ``batch``;
        records that were not are left out (usually all of them)."""
        fields = sorted({_field(r) for r in batch})
        try:
            notes = self._redis.hmget(self._key, fields)
        except redis.RedisError as exc:
            self._failed("read the attempt notes", exc)
            return {}
        return self._tried(batch, dict(zip(fields, notes, strict=True)))

    def start(self, batch: Sequence[ConsumedRecord]) -> dict[int, int]:
        """:meth:`tried`, and when no record of ``batch`` was, :meth:`begin` it as tried once: one round
        trip (which also ends the notes ``end(later=True)`` left) unless a stale note is in the way."""
        mapping = self._notes(batch, 1)
        fields = sorted(mapping)
        ending = [part for pair in self._ending.items() for part in pair]
        noting = [part for name in fields for part in (name, mapping[name])]
        try:
            found = self._start(keys=[self._key], args=[len(self._ending), *ending, self._ttl_ms, *noting])
        except redis.RedisError as exc:
            self._failed("note the records being tried", exc)
            return {}
        self._ending.clear()
        if not any(found):
            self._mine.update(mapping)
            self._reached()
            return {}
        tried = self._tried(batch, dict(zip(fields, found, strict=True)))
        if not tried:  # notes of other offsets (a stale one): this batch's replace them
            self.begin(batch, 1)
        return tried

    def _tried(self, batch: Sequence[ConsumedRecord], notes: dict[str, Any]) -> dict[int, int]:
        ranges: dict[str, tuple[int, int, int]] = {}
        for name, note in notes.items():
            if note is None:
                continue
            text = note.decode() if isinstance(note, bytes) else str(note)
            try:
                first, last, attempts = (int(part) for part in text.split(":"))
            except ValueError:
                self._log.warning("ignoring a malformed attempt note for %s: %r", name, text[:100])
                continue
            ranges[name] = (first, last, attempts)
        tried = {}
        for i, record in enumerate(batch):
            noted = ranges.get(_field(record))
            if noted is not None and noted[0] <= record.offset <= noted[1]:
                tried[i] = noted[2]
        return tried

    @staticmethod
    def _notes(records: Sequence[ConsumedRecord], attempts: int) -> dict[str, str]:
        spans: dict[str, tuple[int, int]] = {}
        for record in records:
            name = _field(record)
            first, last = spans.get(name, (record.offset, record.offset))
            spans[name] = (min(first, record.offset), max(last, record.offset))
        return {name: f"{first}:{last}:{attempts}" for name, (first, last) in spans.items()}

    def begin(self, records: Sequence[ConsumedRecord], attempts: int) -> None:
        """Note that ``records`` are being tried, for the ``attempts``-th time."""
        mapping = self._notes(records, attempts)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(self._key, mapping=mapping)  # type: ignore[arg-type]
            # Offsets are not forever (a re-created topic, a broker that forgot them, starts again at 0):
            # a note nobody came back to within the TTL must not dead-letter new records unrun.
            pipe.pexpire(self._key, self._ttl_ms)
            pipe.execute()
        except redis.RedisError as exc:
            self._failed("note the records being tried", exc)
        else:
            self._mine.update(mapping)
            self._reached()

    def end(self, records: Sequence[ConsumedRecord], later: bool = False) -> None:
        """The run of ``records`` ended without stopping the replica. ``later``: their offsets are
        committed, so no owner reads them again and their notes can wait to be removed with the next
        :meth:`start` (or :meth:`flush`)."""
        for name in sorted({_field(r) for r in records}):
            if name in self._mine:
                self._ending[name] = self._mine.pop(name)
        if not later:
            self.flush()

    def flush(self) -> None:
        """Remove now the notes of runs that ended."""
        if not self._ending:
            return
        mine = [part for pair in self._ending.items() for part in pair]
        self._ending.clear()
        try:
            self._end_mine(keys=[self._key], args=mine)
        except redis.RedisError as exc:
            self._failed("clear the attempt notes", exc)
