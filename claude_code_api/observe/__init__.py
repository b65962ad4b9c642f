"""What the service tells its operator: metrics, logs, the container's health check.

* :mod:`.metrics`: the Prometheus metrics (``GET /metrics``).
* :mod:`.logs`: one log format for every line.
* :mod:`.healthcheck`: ``python -m claude_code_api.observe.healthcheck``, the image's HEALTHCHECK.
"""
