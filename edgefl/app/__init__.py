"""The application layer: what a user runs, standing on the rooms.

``cli`` (the ``edgefl`` command), ``demo``, ``launcher`` (federations of real
processes, for the demo, the benchmarks and the tests), ``report`` (tables and plots of
a run) and ``tff_runtime`` (TFF's own executor, which only tests and benchmarks use as
a reference). It imports the rooms (``coordinator``, ``device_sim``, ``export``) and the
ground (the rest of ``edgefl``); nothing below imports it (an import contract in
``pyproject.toml``, checked by ``make test``).
"""
