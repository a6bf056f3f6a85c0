"""The durable upstream path: the outbox keeps every record bound upstream, the shipper sends it.

``outbox``  one SQLite (WAL) queue: byte bound with a drop order, batch keys, dead letters,
            corruption recovery at open.
``shipper`` one background task: batches by size and age, msgpack or JSON, gzip, a stable
            ``Idempotency-Key`` per batch, backoff with full jitter, ``Retry-After``.

Neither module imports the web app or the other taps; ``app.py`` wires them.
"""
