"""Drift monitoring: sketch live inputs and outputs, compare them with a baseline, report.

Modules, bottom up: ``scores`` (PSI, JS, KS, mean shift, statuses; pure), ``sketches``
(mergeable numeric and categorical sketches; tensors to feature columns), ``profile`` (the
baseline: frozen edges and vocabularies, its msgpack artifact, compatibility checks),
``window`` (one model version's tumbling window, since-deploy sketches and reports). The
package imports only leaf modules (``errors``, ``tensors``); ``app.py`` wires it to events.
"""
