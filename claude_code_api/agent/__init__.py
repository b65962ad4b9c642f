"""Agents: one Claude Code process each, and everything about how it runs.

* :mod:`.protocol`: the seam (:class:`Agent`, :class:`AgentSpec`, the factory) that workers,
  session actors and turns use; :mod:`.sdk` the real one (the only module that drives the SDK),
  :mod:`.sdk_workarounds` what the SDK drops (its pinned version only), :mod:`.metered` metrics.
* :mod:`.startup`: decides once how agents launch; :mod:`.sandbox` their environment, sandbox
  and launcher; :mod:`.limits`, :mod:`.cgroups` what one agent may take; :mod:`.acl` the ACL a
  root service grants without a sandbox; :mod:`.reaper_process` the watchdog process.

Imports run one way: this package imports ``config``, ``messages``, ``observe`` and ``auth``,
nothing of the actors or of HTTP.
"""
