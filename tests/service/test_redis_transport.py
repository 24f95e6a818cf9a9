"""tasks.redis_transport against a real redis-server: a message is unacked from the moment it leaves its queue.

Workers killed inside the old window are in test_faults.py; these drive kombu directly (a second each).
"""

from __future__ import annotations

import logging
import time
from contextlib import suppress

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Queue

from tasks.redis_transport import Transport

pytestmark = pytest.mark.service

DB = 9  # apart from the session worker's database


@pytest.fixture
def url(redis_url):
    url = f"{redis_url}/{DB}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
        yield url


def publish(url: str, queue: Queue, body, **options) -> None:
    """With kombu's stock transport, as clients and the gateway publish."""
    with Connection(url) as connection, connection.Producer() as producer:
        producer.publish(body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue], **options)


def job_queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), name)


def drain(connection: Connection, received: list, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(received) < count:
        assert time.monotonic() < deadline, f"received {len(received)} of {count} messages"
        with suppress(TimeoutError):
            connection.drain_events(timeout=1)


def test_a_message_taken_by_a_consumer_that_dies_before_reading_it_comes_back(url):
    jobs = job_queue("jobs")
    publish(url, jobs, {"job": 1})
    store = redis.Redis.from_url(url)

    with Connection(url, transport=Transport) as dying:
        channel = dying.channel()
        Consumer(channel, [jobs], callbacks=[lambda body, message: None]).consume()
        dying.transport.cycle.on_poll_start()  # sends what the event loop sends; the reply is never read
        time.sleep(0.3)
        # The message left its queue and is unacked: kombu's own transport would hold it only in this socket.
        assert (store.llen("jobs"), store.hlen("unacked"), store.zcard("unacked_index")) == (0, 1, 1)
        channel.client.connection.disconnect()

    received = []
    options = {"visibility_timeout": 1, "unacked_restore_throttle": 1}
    with Connection(url, transport=Transport, transport_options=options) as rescuer:
        time.sleep(1.1)
        with Consumer(rescuer, [jobs], callbacks=[lambda body, message: (received.append(message), message.ack())]):
            drain(rescuer, received, 1)

    assert received[0].payload == {"job": 1} and received[0].delivery_info["redelivered"]
    assert (store.llen("jobs"), store.hlen("unacked"), store.zcard("unacked_index")) == (0, 0, 0)


def test_queues_priorities_and_no_ack_consumers(url):
    jobs, replies = job_queue("jobs"), job_queue("replies")
    store = redis.Redis.from_url(url)
    received = []

    def on_message(body, message):
        # Registered as unacked when delivered, except for a no-ack consumer's messages.
        received.append((body, store.hlen("unacked")))
        if body != "reply":
            message.ack()

    with Connection(url, transport=Transport) as connection:
        channel = connection.channel()
        with Consumer(channel, [jobs], callbacks=[on_message]), Consumer(channel, [replies], callbacks=[on_message],
                                                                        no_ack=True):  # fmt: skip
            publish(url, jobs, "first")
            drain(connection, received, 1)
            # While the consumer waits on "jobs": a lower priority level and another queue.
            publish(url, jobs, "low priority", priority=9)
            publish(url, replies, "reply")
            drain(connection, received, 3, timeout=5)

    assert sorted(received) == [("first", 1), ("low priority", 1), ("reply", 0)]
    assert (store.hlen("unacked"), store.zcard("unacked_index")) == (0, 0)


def test_an_unreadable_message_is_dropped_with_one_line(url, caplog):
    jobs = job_queue("jobs")
    publish(url, jobs, "declared")
    store = redis.Redis.from_url(url)
    store.rpush("jobs", b"{not json")  # taken first
    received = []

    def on_message(body, message):
        received.append(body)
        message.ack()

    connection = Connection(url, transport=Transport)
    with caplog.at_level(logging.ERROR), connection, Consumer(connection, [jobs], callbacks=[on_message]):
        drain(connection, received, 1)

    assert received == ["declared"]
    assert (store.llen("jobs"), store.hlen("unacked"), store.zcard("unacked_index")) == (0, 0, 0)
    assert "dropped an unreadable message (9 bytes) from queue 'jobs'" in caplog.text


def test_an_ack_on_the_channel_of_a_lost_connection_is_a_connection_error(url):
    # As a worker's consumer leaves the channel after a Redis restart: connection collected, pool dropped.
    # kombu's transport raised AttributeError here, which killed batching workers ("Unrecoverable error").
    jobs = job_queue("jobs")
    publish(url, jobs, "finished after a Redis restart")
    received = []
    connection = Connection(url, transport=Transport)
    with Consumer(connection, [jobs], callbacks=[lambda body, message: received.append(message)]):
        drain(connection, received, 1)
    connection.collect()
    received[0].channel._disconnect_pools()

    with pytest.raises(redis.ConnectionError, match="the connection this message came on is closed"):
        received[0].ack()
    store = redis.Redis.from_url(url)
    assert store.llen("jobs") + store.hlen("unacked") == 1  # handed back, now or after the visibility timeout


def test_a_full_redis_still_hands_out_jobs(url):
    # Over maxmemory with noeviction (compose's policy) Redis refuses BLMOVE but runs the claim.
    jobs = job_queue("jobs")
    publish(url, jobs, "queued before Redis filled up")
    store = redis.Redis.from_url(url)
    received = []
    connection = Connection(url, transport=Transport)
    with connection, Consumer(connection, [jobs], callbacks=[lambda body, message: received.append(body)]):
        try:
            store.set("ballast", "x" * 2_000_000)
            store.config_set("maxmemory", "1mb")
            drain(connection, received, 1)
            with pytest.raises(TimeoutError):  # idle: the refused wait is followed by a one-second sleep
                connection.drain_events(timeout=2)
        finally:
            store.config_set("maxmemory", "0")
        publish(url, jobs, "sent once there was room")
        drain(connection, received, 2, timeout=5)

    assert received == ["queued before Redis filled up", "sent once there was room"]
