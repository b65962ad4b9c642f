"""The benchmarks: modules that print figures, run with ``python -m bench.<name>``.

One module per benchmark (``pool``, ``sessions``, ``metrics``, ``compat``, ``stream``,
``user_claude``, ``isolation``, ``registry``, ``model_proxy``, ``agent_network``,
``soak``), sharing one launcher (:mod:`bench.service`, over ``tests/support/harness.py``; the
original service through :mod:`bench.original`) and one statistics module
(:mod:`bench.stats`). Nothing here asserts: the soak's checks are ``tests/unit/test_soak.py``.
``bench/README.md`` says what each figure means.
"""
