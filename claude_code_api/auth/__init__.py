"""The Claude credentials agents use: which ones, the login (OAuth), and their renewal.

* :mod:`.credentials`: API key or login, and the service's credentials file.
* :mod:`.oauth`: the Claude login's PKCE flow and token endpoint.
* :mod:`.renewal`: how running agents pick up new credentials.

The actor that owns the credentials file is :mod:`claude_code_api.actors.claude_login`; who
may call the service (API keys, tokens) is :mod:`claude_code_api.http.auth`.
"""
