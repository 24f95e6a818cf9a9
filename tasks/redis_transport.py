"""kombu's Redis transport without its loss window: a message leaves its queue and becomes unacked in one step.

kombu's consumer takes a message with BRPOP and only afterwards records it as unacked (QoS.append:
ZADD unacked_index + HSET unacked, a second round trip). Between the two the message exists only in
the consumer's socket or memory: a process killed there (or Redis killed before the second write)
loses it for good. The window is microseconds in a quiet prefork main process, but a batching process
reads its socket only when the compute thread lets go of the GIL: a 10-minute fault storm lost 5 of
526 jobs that way (docs/reliability.md).

Here a consumer instead runs one Lua script (`CLAIM`) that pops the first message of its queues, in
the order BRPOP would, and registers it as unacked in the same atomic step. Scripts cannot block, so
an idle consumer waits with `BLMOVE key key RIGHT RIGHT` on the default-priority list of the queue it
last received from: the message stays where it is (the same end of the same list: a blocking peek;
Redis >= 6.2), the consumer wakes and claims. The wait covers one list; messages on other queues and
priority levels are found by the next claim, at most `brpop_timeout` (1 s) after they arrive while the
consumer is idle.

A claimed message whose process dies before reading the reply is in the unacked set like a running job
and is handed back by kombu's restore_visible within the visibility timeout + its sweep interval (the
bound the worker logs at start). Nothing else changes: publishing is kombu's own (clients may use the
stock transport), no-ack consumers (control replies) take messages without registering them, fanout
goes through PUB/SUB as before. Selected by `broker_transport` (tasks.celery_app) for redis:// URLs.
"""

from __future__ import annotations

import uuid
from queue import Empty
from time import monotonic, time

from kombu.transport import redis, virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from redis.exceptions import OutOfMemoryError

# KEYS: the queue lists in BRPOP order, then the unacked hash and its index (sorted by claim time).
# ARGV: the delivery tag, the claim time, then per list the end of the unacked entry ('' for a no-ack
# consumer: nothing to register). The entry is kombu's [message, exchange, routing key] built without
# decoding the message (a large one would stall Redis); exchange '' and routing key = the queue it came
# from make kombu's restore push it back onto that queue.
CLAIM = """
local lists = #KEYS - 2
for i = 1, lists do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local entry_end = ARGV[2 + i]
    if entry_end ~= '' then
      redis.call('HSET', KEYS[lists + 1], ARGV[1], '[' .. item .. entry_end)
      redis.call('ZADD', KEYS[lists + 2], ARGV[2], ARGV[1])
    end
    return {i, item}
  end
end
return false
"""


class QoS(redis.QoS):
    def ack(self, delivery_tag):
        self._check_reachable()
        super().ack(delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        self._check_reachable()
        super().reject(delivery_tag, requeue)

    def _check_reachable(self):
        """A job that ends after a Redis restart acks through the channel of the lost connection.

        When kombu has dropped both that channel's pool and its connection parameters, the ack raised
        AttributeError in the worker's event loop: "Unrecoverable error", the worker gone (7 batching
        workers in one 10-minute fault storm). As a connection error Celery logs it ("Couldn't ack");
        the message stays unacked and comes back after the visibility timeout, and that attempt
        returns the stored file.
        """
        channel = self.channel
        if channel._pool is None and getattr(channel.connection, "client", None) is None:
            raise redis.get_redis_ConnectionError()("the connection this message came on is closed (Redis restarted?)")

    def append(self, message, delivery_tag):
        claimed = self.channel.claimed_tags
        if delivery_tag in claimed:  # CLAIM registered it in Redis already
            claimed.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
        else:  # a fanout message or basic_get: kombu's two steps
            super().append(message, delivery_tag)


class Channel(redis.Channel):
    QoS = QoS

    _claim_next = True  # False after an empty claim: the next command waits
    _wake_key = None
    # Redis over maxmemory (noeviction, as compose runs it) refuses BLMOVE, a write, but runs CLAIM
    # (measured, Redis 7.0). Then an idle consumer sleeps on a list nobody fills (BRPOP, allowed)
    # and claims every brpop_timeout (1 s). kombu's own transport lost every message it took there:
    # BRPOP popped it and the unacked HSET was refused.
    _wait_refused = False
    SLEEP_KEY = "_pocket_tts.nothing"

    def __init__(self, *args, **kwargs):
        self.claimed_tags: set[str] = set()  # delivered by CLAIM, not yet seen by QoS.append
        self._no_ack_queues: set[str] = set()
        self._claim = None  # (delivery tag, keys) of the command in flight
        super().__init__(*args, **kwargs)

    def basic_consume(self, queue, no_ack, *args, **kwargs):
        (self._no_ack_queues.add if no_ack else self._no_ack_queues.discard)(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def _brpop_start(self, timeout=None):
        timeout = self.brpop_timeout if timeout is None else timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        prefixed = [self.global_keyprefix + key for key in keys]
        if self._claim_next:
            tag = str(uuid.uuid4())
            entry_ends = [self._unacked_entry_end(key.rsplit(self.sep, 1)[0]) for key in keys]
            unacked = [self.global_keyprefix + self.unacked_key, self.global_keyprefix + self.unacked_index_key]
            command = ["EVAL", CLAIM, len(keys) + 2, *prefixed, *unacked, tag, repr(time()), *entry_ends]
            self._claim = tag, keys
        elif self._wait_refused:
            command = ["BRPOP", self.global_keyprefix + self.SLEEP_KEY, timeout or 1]
            self._claim = None
        else:
            wake = self.global_keyprefix + (self._wake_key if self._wake_key in keys else keys[0])
            command = ["BLMOVE", wake, wake, "RIGHT", "RIGHT", timeout or 0]
            self._claim = None
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self.client.connection.send_command(*command)

    def _registers(self, queue: str) -> bool:
        return self.ack_emulation and queue not in self._no_ack_queues

    def _unacked_entry_end(self, queue: str) -> str:
        return f',"",{dumps(queue)}]' if self._registers(queue) else ""

    def _brpop_read(self, **options):
        claim, self._claim = self._claim, None
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "EVAL" if claim else "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next poll reconnects
                raise
            except OutOfMemoryError as exc:
                if claim is not None:
                    raise
                redis.logger.warning("Redis is full (%s): waiting for jobs by polling every second", exc)
                self._wait_refused, reply = True, None
            self._claim_next = claim is None or bool(reply)  # after a wake, or a message: claim again
            if reply and claim is not None:
                self._wait_refused = False  # try BLMOVE again at the next wait
            if claim is None or not reply:
                raise Empty()
            tag, keys = claim
            index, item = reply
            key = keys[int(index) - 1]
            queue = key.rsplit(self.sep, 1)[0]
            self._wake_key = queue  # its default-priority list, where most messages arrive
            self._queue_cycle.rotate(queue)
            self._deliver_claimed(bytes_to_str(item), queue, tag)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _deliver_claimed(self, item: str, queue: str, tag: str) -> None:
        registered = self._registers(queue)
        try:
            payload = loads(item)
            payload["properties"]["delivery_tag"] = tag  # acks and restores use the tag CLAIM registered
        except (ValueError, TypeError, KeyError, IndexError):
            self._drop(tag, queue, item, registered)
            raise Empty() from None
        if registered:
            self.claimed_tags.add(tag)
        try:
            self.connection._deliver(payload, queue)
        except Exception:
            if tag not in self.claimed_tags:  # failed after kombu took the message: the consumer's error
                raise
            self.claimed_tags.discard(tag)  # kombu could not read it (e.g. an undecodable body)
            self._drop(tag, queue, item, registered)
            raise Empty() from None

    def _drop(self, tag: str, queue: str, item: str, registered: bool) -> None:
        """Forget a message kombu cannot read; without this it would come back after every visibility timeout."""
        if registered:
            self.qos._remove_from_indices(tag).execute()
        redis.logger.error("dropped an unreadable message (%d bytes) from queue %r", len(item), queue)


class Transport(redis.Transport):
    Channel = Channel
