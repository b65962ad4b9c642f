"""See the service answer without a Claude account: a local stand-in for the model API.

:mod:`.mock_messages_api` is a scriptable Messages API on 127.0.0.1 (the tests drive the
real CLI against it too); :mod:`.answers` scripts what it says in the demo;
``python -m claude_code_api.demo`` (``scripts/demo``) runs it with the service wired to it.
"""
