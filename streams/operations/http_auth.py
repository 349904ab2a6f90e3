"""The optional bearer token of the worker's and the learner's JSON status endpoints.

``DEALSTREAM_HTTP_TOKEN`` unset: everything is open (bind to loopback, the default). Set:
``/status.json`` answers 401 unless the request carries ``Authorization: Bearer <token>``,
compared in constant time.
"""

from __future__ import annotations

import hmac

from streams.settings import Secret

UNAUTHORIZED = {"error": "this endpoint needs Authorization: Bearer <DEALSTREAM_HTTP_TOKEN>"}
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="dealstream"'}


def bearer_ok(header: str | None, token: Secret | None) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (always true without a token).

    >>> bearer_ok("Bearer 0123456789abcdef", Secret("0123456789abcdef"))
    True
    >>> bearer_ok(None, Secret("0123456789abcdef")), bearer_ok(None, None)
    (False, True)
    """
    if token is None:
        return True
    expected = f"Bearer {token.reveal()}".encode()
    return hmac.compare_digest((header or "").encode(), expected)
