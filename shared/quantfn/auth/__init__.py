"""API keys: the ``Authorization: Bearer <key>`` the OpenAI and Cohere clients send, checked against hashed records.

``keys`` makes and checks keys (format, SHA-256, constant-time comparison), ``store`` keeps their records in
SSM Parameter Store (one parameter per key, cached in the process), ``cli`` is ``quantfn keys``. The
authorizer function (functions/authorizer) is the only caller in Lambda; nothing here sees an AWS event.
"""
