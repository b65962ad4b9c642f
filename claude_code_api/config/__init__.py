"""The service's settings, declared once (:mod:`.settings`), and what derives from them.

* :mod:`.settings`: every setting (name, type, default, unit, doc), read from the environment
  once; README's table is generated from it (``python -m claude_code_api.config README.md``).
* :mod:`.env_example`: ``.env.example`` from the same declarations.
* :mod:`.ceiling`: what the operator lets a run ask for.
"""
