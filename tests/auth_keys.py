"""Keys and tokens made in the tests: RSA, EC, Ed25519 key pairs, their JWKS
entries, and tokens signed with PyJWT (the gateway's own library checks them,
but nothing here is taken from the gateway)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

SECRET = "an-hs256-secret-of-at-least-32-bytes!"


@dataclass
class KeyPair:
    kid: str
    alg: str
    private: Any
    public: Any

    def jwk(self) -> dict[str, Any]:
        if self.alg.startswith(("RS", "PS")):
            data = RSAAlgorithm.to_jwk(self.public, as_dict=True)
        elif self.alg.startswith("ES"):
            data = ECAlgorithm.to_jwk(self.public, as_dict=True)
        else:
            data = OKPAlgorithm.to_jwk(self.public, as_dict=True)
        return {**data, "kid": self.kid, "use": "sig"}

    def token(self, claims: dict[str, Any] | None = None, **header: Any) -> str:
        return sign(self.private, self.alg, claims, kid=self.kid, **header)


def make_key(alg: str, kid: str) -> KeyPair:
    private: Any
    if alg.startswith(("RS", "PS")):
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif alg == "ES384":
        private = ec.generate_private_key(ec.SECP384R1())
    else:
        private = ed25519.Ed25519PrivateKey.generate()
    return KeyPair(kid, alg, private, private.public_key())


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "alice",
        "iss": "https://id.test",
        "aud": "orders-api",
        "iat": now,
        "exp": now + 600,
        "scope": "orders:read profile",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: Any, alg: str, body: dict[str, Any] | None = None, **header: Any) -> str:
    headers = {k: v for k, v in header.items() if v is not None}
    return jwt.encode(body if body is not None else claims(), key, algorithm=alg, headers=headers)


def jwks(*pairs: KeyPair) -> str:
    return json.dumps({"keys": [pair.jwk() for pair in pairs]})


def b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(body: dict[str, Any], header: dict[str, Any]) -> str:
    """A token with any header at all (alg none, hostile kid) and a junk signature."""
    return (
        f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}."
        f"{b64(b'not-a-signature')}"
    )
