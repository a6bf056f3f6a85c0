"""Drift monitoring: sketch live inputs and outputs, compare them with a baseline, report.

Modules, bottom up: ``scores`` (PSI, JS, KS, mean shift, statuses; pure), ``sketches``
(mergeable numeric and categorical sketches), ``features`` (tensors to feature columns),
``profile`` (the baseline: frozen edges and vocabularies, its msgpack artifact,
compatibility checks), ``window`` (one model version's tumbling window, since-deploy
sketches and reports), ``monitor`` (the prediction tap: bounded queue, worker, windows to
the outbox, status events, gauges) and ``baseline`` (profile training data through the
model into a baseline file). The package imports only leaf modules (``clock``, ``errors``,
``events``, ``tensors``); only ``app.py`` and ``cli.py`` import it.
"""
