"""Reading a grant's compact JWS without trusting it (docs/wifi-crypto.md).

Shared by the uploader, which needs `jti` and `epk` from a grant it did not
sign, and by device implementations, which must then verify the signature
with the key they pinned. Nothing here checks a signature.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from provisiond.wifi.crypto import b64url_decode

# A grant travels through a BLE characteristic; anything larger is not ours.
MAX_GRANT_LEN: Final = 2048


class GrantRejected(Exception):
    """The device refused a grant. `reason` is a short machine code.

    bad_signature, alg_not_allowed, expired, not_yet_valid, wrong_audience,
    wrong_subject, missing_cap, replayed, stale_iat, wrong_nonce, malformed,
    unknown_kid, busy (an attempt with credentials is still running).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"grant rejected: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Jws:
    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def json_segment(segment: str) -> dict[str, Any]:
    doc = json.loads(b64url_decode(segment).decode("utf-8"))
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def split_jws(blob: str) -> Jws:
    """Decode the three JWS segments without trusting any of them yet."""
    if not isinstance(blob, str) or len(blob) > MAX_GRANT_LEN or not blob.isascii():
        raise GrantRejected("malformed", "not a compact JWS")
    parts = blob.split(".")
    if len(parts) != 3:
        raise GrantRejected("malformed", "expected three segments")
    try:
        header = json_segment(parts[0])
        claims = json_segment(parts[1])
        signature = b64url_decode(parts[2])
    except (ValueError, UnicodeDecodeError) as exc:
        raise GrantRejected("malformed", str(exc)) from exc
    # The signature covers the segments as transmitted, not a re-encoding.
    return Jws(header, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)


def parse_unverified(blob: str) -> dict[str, Any]:
    """Claims of a grant WITHOUT checking its signature.

    For the uploader only, which needs `jti` and `epk` but is not the party
    the grant protects; never use this to decide whether to trust a grant.
    """
    return split_jws(blob).claims
