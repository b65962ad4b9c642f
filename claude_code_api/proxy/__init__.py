"""The ways out of an agent's sandbox, served by the service outside every sandbox.

* :mod:`.model`: the model proxy: agents reach the model API through it with a token of
  their own; it adds the real credential and counts usage.
* :mod:`.egress`: the CONNECT proxy, by allowlist (``AGENT_EGRESS``).
"""
