"""Identity and access rules: pure functions and the policy Structs.

Nothing here does I/O or keeps state: the key stores (JWKS files and URLs,
API-key files, the token cache) are in gateway/state/auth.py and the step of
the handler that uses them in gateway/edges/auth.py.

Signatures are PyJWT's (over `cryptography`), never ours: it checks `alg`
against the list we pass, refuses `none` unless asked, and its HMAC key
preparation refuses PEM/SSH public keys, so an HS token "signed" with a
public key cannot pass even if a key reached it (CVE-2022-29217 was that
hole). We still never hand it one: HS keys come only from `secret_env`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

import msgspec

AuthType = Literal["jwt", "api_key"]

# The algorithms a policy may accept (RFC 7518 3.1, RFC 8037 for EdDSA).
JWT_ALGORITHMS: Final = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "ES256",
    "ES384",
    "EdDSA",
    "HS256",
    "HS384",
    "HS512",
)
HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
# Which JWK a token's `alg` may be checked against (kty, and crv for EC/OKP).
_KEY_KINDS: Final[dict[str, tuple[str, frozenset[str] | None]]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
# Bounds on what a token or a key set may cost us.
MAX_TOKEN_BYTES: Final = 8192
MAX_JWKS_BYTES: Final = 1 << 20
MAX_JWKS_KEYS: Final = 64
MAX_KID_CHARS: Final = 256
MAX_API_KEY_CHARS: Final = 512

PLACEHOLDERS: Final = ("client_ip", "request_id", "route", "host", "consumer")
_PLACEHOLDER: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.:-]*)\}")
_CLAIM_NAME: Final = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_UNSENDABLE: Final = re.compile(r"[\r\n\x00]")
CONSUMER_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_HEX64: Final = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------
# Policy and rule Structs (the resolved config; see gateway/core/config.py)
# --------------------------------------------------------------------------


class JwtPolicy(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="jwt"):
    name: str
    algorithms: tuple[str, ...]
    jwks_file: str | None = None
    jwks: str | None = None  # the file's text, read at load (so a reload re-reads it)
    jwks_url: str | None = None
    jwks_refresh: float = 300.0
    secret_env: str | None = None
    secret: str | None = None  # the variable's value, read at load
    issuer: str | None = None
    audiences: tuple[str, ...] = ()
    leeway: float = 30.0
    forward_claims: tuple[tuple[str, str], ...] = ()  # (claim, header)

    def __repr__(self) -> str:  # never print the secret
        return f"JwtPolicy(name={self.name!r}, algorithms={self.algorithms!r})"

    def rules(self) -> JwtPolicy:
        """The policy without its key material: a change here empties its token cache."""
        return msgspec.structs.replace(self, jwks=None, secret=None)


class Consumer(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    key_sha256: str
    scopes: tuple[str, ...] = ()


class ApiKeyPolicy(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="api_key"):
    name: str
    header: str = "X-Api-Key"
    keys_file: str = ""
    consumers: tuple[Consumer, ...] = ()
    forward_consumer: str | None = None


AuthPolicy = JwtPolicy | ApiKeyPolicy


class AccessConfig(msgspec.Struct, frozen=True, kw_only=True):
    scopes: tuple[str, ...] = ()
    claims: tuple[tuple[str, tuple[str | int | bool, ...]], ...] = ()
    allow_ips: tuple[str, ...] = ()
    deny_ips: tuple[str, ...] = ()


class Template(msgspec.Struct, frozen=True):
    """A header value or redirect with placeholders, parsed once at load.

    `parts` alternate literal text and placeholder names: even indices are
    literals, odd ones names (`client_ip`, `claim.sub`, ...)."""

    parts: tuple[str, ...]


class HeaderTransform(msgspec.Struct, frozen=True, kw_only=True):
    set: tuple[tuple[str, Template], ...] = ()
    add: tuple[tuple[str, Template], ...] = ()
    remove: tuple[str, ...] = ()


class RewriteConfig(msgspec.Struct, frozen=True, kw_only=True):
    pattern: str
    replace: str


# --------------------------------------------------------------------------
# Placeholders
# --------------------------------------------------------------------------


def parse_template(text: str, extra: Iterable[str] = ()) -> Template:
    """`"{client_ip} x"` -> Template; raises ValueError naming an unknown placeholder.

    Known: the contract's `PLACEHOLDERS`, `claim.NAME`, and `extra` (`path`
    for a redirect). A lone "{" or "}" is literal text.
    """
    allowed = set(PLACEHOLDERS) | set(extra)
    parts: list[str] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(text):
        name = match.group(1)
        if name not in allowed and not (
            name.startswith("claim.") and _CLAIM_NAME.fullmatch(name.removeprefix("claim."))
        ):
            raise ValueError(f"unknown placeholder {{{name}}}")
        parts.append(text[pos : match.start()])
        parts.append(name)
        pos = match.end()
    parts.append(text[pos:])
    return Template(tuple(parts))


def claim_text(value: object) -> str | None:
    """A claim as a header value: strings as they are, arrays joined with
    spaces (as OAuth's `scope`), numbers and booleans in JSON; None for
    objects and null (nothing sensible to send)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, list):
        items = [claim_text(item) for item in value]
        return " ".join(item for item in items if item is not None)
    return None


def expand(template: Template, values: Mapping[str, str], claims: Mapping[str, Any]) -> str | None:
    """The template filled in; None when the result could not be sent safely
    (a CR, LF or NUL from a claim or a client's value: a header split, RFC
    9112 2.2), or a referenced claim is missing an acceptable value."""
    parts = template.parts
    if len(parts) == 1:
        return parts[0]
    out: list[str] = []
    for index, part in enumerate(parts):
        if not index % 2:
            out.append(part)
        elif part.startswith("claim."):
            out.append(claim_text(claims.get(part[6:])) or "")
        else:
            out.append(values.get(part, ""))
    text = "".join(out)
    return None if _UNSENDABLE.search(text) else text


def sendable(value: str) -> bool:
    """No CR, LF or NUL: the value cannot end its field early."""
    return _UNSENDABLE.search(value) is None


# --------------------------------------------------------------------------
# Scopes and claims
# --------------------------------------------------------------------------


def token_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """OAuth scopes a token grants: `scope` (space-separated, RFC 8693 4.2)
    and/or `scp` (an array, as Azure AD and Okta write it)."""
    granted: set[str] = set()
    scope = claims.get("scope")
    if isinstance(scope, str):
        granted.update(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, list):
        granted.update(item for item in scp if isinstance(item, str))
    elif isinstance(scp, str):
        granted.update(scp.split())
    return frozenset(granted)


def has_scopes(required: Iterable[str], granted: frozenset[str]) -> bool:
    """Every required scope is granted (exact, case-sensitive: RFC 6749 3.3)."""
    return all(scope in granted for scope in required)


def _same(a: object, b: object) -> bool:
    # True == 1 in Python; a claim `true` must not satisfy a required 1.
    return type(a) is type(b) and a == b


def claims_match(
    required: Iterable[tuple[str, tuple[str | int | bool, ...]]], claims: Mapping[str, Any]
) -> bool:
    """Each required claim equals one of its values; an array claim contains one."""
    for name, values in required:
        value = claims.get(name)
        if isinstance(value, list):
            if not any(_same(item, wanted) for item in value for wanted in values):
                return False
        elif not any(_same(value, wanted) for wanted in values):
            return False
    return True


# --------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_cidr(text: str) -> Network:
    """A CIDR or a bare address; ValueError for anything else (host bits allowed)."""
    return ipaddress.ip_network(text, strict=False)


class IpRules:
    """allow_ips / deny_ips: deny first, then allow (empty allow = everyone).

    An address that cannot be read (a unix-socket peer) is refused whenever
    a rule exists: a rule that cannot be evaluated must not open the route.
    """

    __slots__ = ("_allow", "_deny")

    def __init__(self, allow: Iterable[str], deny: Iterable[str]) -> None:
        self._allow = tuple(parse_cidr(c) for c in allow)
        self._deny = tuple(parse_cidr(c) for c in deny)

    def admits(self, client: str) -> bool:
        try:
            address = ipaddress.ip_address(client.strip("[]").partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in self._deny):
            return False
        return not self._allow or any(address in net for net in self._allow)


# --------------------------------------------------------------------------
# API keys
# --------------------------------------------------------------------------


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


class ApiKeyTable:
    """Consumers by key hash.

    The lookup hashes the presented key first, so what is looked up is a
    SHA-256 digest the client cannot steer, and a dict probe on it tells
    nothing about which keys exist or how much of one was guessed; the final
    comparison is constant-time all the same (hmac.compare_digest).
    """

    __slots__ = ("_by_hash",)

    def __init__(self, consumers: Iterable[Consumer]) -> None:
        self._by_hash = {c.key_sha256: c for c in consumers}

    def find(self, key: str) -> Consumer | None:
        if not key or len(key) > MAX_API_KEY_CHARS:
            return None
        digest = hash_key(key)
        consumer = self._by_hash.get(digest)
        if consumer is None or not hmac.compare_digest(consumer.key_sha256, digest):
            return None
        return consumer


def parse_keys_file(text: str) -> tuple[list[Consumer], list[str]]:
    """An API-key file (`[consumers.NAME] key_sha256, scopes`) -> consumers, errors.

    Errors are `consumers.NAME.key: message` lines."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return [], [str(exc)]
    errors: list[str] = []
    consumers: list[Consumer] = []
    for key in doc:
        if key != "consumers":
            errors.append(f"{key}: unknown key")
    raw = doc.get("consumers", {})
    if not isinstance(raw, dict):
        return [], [*errors, "consumers: must be a table of [consumers.NAME] tables"]
    seen: dict[str, str] = {}
    for name, entry in raw.items():
        here = f"consumers.{json.dumps(name)}"
        if not CONSUMER_NAME.fullmatch(name):
            errors.append(f"{here}: a name is 1-128 of A-Z a-z 0-9 . _ : @ -")
        if not isinstance(entry, dict):
            errors.append(f"{here}: must be a table")
            continue
        for field in entry:
            if field not in ("key_sha256", "scopes"):
                errors.append(f"{here}.{field}: unknown key")
        digest = entry.get("key_sha256")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest.lower()):
            errors.append(f"{here}.key_sha256: must be the 64 hex digits of a SHA-256")
            continue
        digest = digest.lower()
        if digest in seen:
            errors.append(f"{here}.key_sha256: the same key as consumer {seen[digest]!r}")
            continue
        seen[digest] = name
        scopes = entry.get("scopes", [])
        if not isinstance(scopes, list) or not all(
            isinstance(s, str) and s and sendable(s) and " " not in s for s in scopes
        ):
            errors.append(f"{here}.scopes: must be an array of scope names")
            continue
        consumers.append(Consumer(name=name, key_sha256=digest, scopes=tuple(scopes)))
    return consumers, errors


# --------------------------------------------------------------------------
# JWT
# --------------------------------------------------------------------------


class TokenRejected(Exception):
    """A token that does not pass; `reason` is `invalid` or `expired`."""

    def __init__(self, reason: Literal["invalid", "expired"], detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class UnknownKid(TokenRejected):
    """No key of the set has the token's `kid`: a JWKS URL is worth refetching."""

    def __init__(self, kid: str) -> None:
        super().__init__("invalid", f"no key with kid {kid[:64]!r}")


class VerifyingKey(msgspec.Struct, frozen=True):
    """One public key of a JWKS, ready for PyJWT; `fingerprint` names it in the cache."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None  # the JWK's own "alg", when it pins one
    key: Any  # a cryptography public key object
    fingerprint: str


def parse_jwks(text: str | bytes) -> list[VerifyingKey]:
    """A JWKS document (RFC 7517 5) -> its usable signature keys.

    Raises ValueError for a document that is not one (not JSON, no `keys`
    array, too large). Keys that cannot be used (unknown kty, `use` other
    than "sig", symmetric `oct` keys, broken values) are skipped: one odd
    key must not take down the rest, as in PyJWKSet. Private parts are
    dropped; only the public key is kept.
    """
    import jwt  # lazily, see verify_jwt

    if len(text) > MAX_JWKS_BYTES:
        raise ValueError(f"JWKS over {MAX_JWKS_BYTES} bytes")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('not a JWKS: no "keys" array')
    keys: list[VerifyingKey] = []
    for entry in doc["keys"][: MAX_JWKS_KEYS * 4]:
        if len(keys) >= MAX_JWKS_KEYS:
            break
        if not isinstance(entry, dict):
            continue
        kty, use, kid, alg = (entry.get(k) for k in ("kty", "use", "kid", "alg"))
        crv = entry.get("crv")
        if kty not in ("RSA", "EC", "OKP") or use not in (None, "sig"):
            continue
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_CHARS):
            continue
        if alg is not None and alg not in _KEY_KINDS:
            continue
        if crv is not None and not isinstance(crv, str):
            continue
        public = {k: v for k, v in entry.items() if k in ("kty", "crv", "n", "e", "x", "y")}
        try:
            loaded: Any = jwt.PyJWK(public, algorithm=_default_alg(kty, crv)).key
        except Exception:  # PyJWT raises a zoo (InvalidKeyError, ValueError, TypeError...)
            continue
        if hasattr(loaded, "public_key") and not hasattr(loaded, "verify"):
            loaded = loaded.public_key()
        if kty == "RSA" and getattr(loaded, "key_size", 0) < 2048:
            continue  # RFC 7518 3.3: 2048 bits or more
        fingerprint = hashlib.sha256(
            json.dumps(public, sort_keys=True, default=str).encode()
        ).hexdigest()
        keys.append(VerifyingKey(kid, kty, crv, alg, loaded, fingerprint))
    return keys


def _default_alg(kty: str, crv: str | None) -> str:
    if kty == "RSA":
        return "RS256"
    if kty == "EC":
        return {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}.get(crv or "", "ES256")
    return "EdDSA"


def key_fits(key: VerifyingKey, alg: str) -> bool:
    kind = _KEY_KINDS.get(alg)
    if kind is None or key.kty != kind[0]:
        return False
    if kind[1] is not None and key.crv not in kind[1]:
        return False
    return key.alg is None or key.alg == alg


def secret_fingerprint(secret: str) -> str:
    return "hs:" + hashlib.sha256(secret.encode()).hexdigest()


class Identity:
    """Who a request authenticated as: the policy, the consumer (JWT `sub`
    or the key's consumer name), its scopes and the token's claims. Built
    once per verified token and shared by every request that repeats it."""

    __slots__ = ("claims", "consumer", "policy", "scopes", "sent")

    def __init__(
        self, policy: str, consumer: str | None, scopes: frozenset[str], claims: dict[str, Any]
    ) -> None:
        self.policy = policy
        self.consumer = consumer
        self.scopes = scopes
        self.claims = claims
        # The identity headers it sends, worked out once for the policy's
        # forwards (the tuple they were worked out for, then the pairs):
        # see gateway/edges/auth.py.
        self.sent: tuple[object, tuple[tuple[str, str], ...]] | None = None


class Verified:
    """A token that passed: its identity, the key that vouched for it and
    until when (unix time: `exp` + leeway)."""

    __slots__ = ("expires_at", "fingerprint", "identity")

    def __init__(self, identity: Identity, fingerprint: str, expires_at: float) -> None:
        self.identity = identity
        self.fingerprint = fingerprint
        self.expires_at = expires_at

    @property
    def claims(self) -> dict[str, Any]:
        return self.identity.claims


def verify_jwt(
    token: str,
    policy: JwtPolicy,
    keys: Iterable[VerifyingKey],
    now: float,
) -> Verified:
    """Check one compact JWS against a policy; raise TokenRejected.

    `alg` must be one of the policy's (never `none`); HS* tokens are checked
    only against the policy's secret, others only against a JWK of the
    matching type and curve; `exp` is required; `nbf`, `iat`, `iss`, `aud`
    are checked, with `leeway`.
    """
    # PyJWT pulls in `cryptography` (0.06 s, ~15 MiB at start-up): imported
    # when JWTs are first verified, a dict lookup after that.
    import jwt

    if len(token) > MAX_TOKEN_BYTES:
        raise TokenRejected("invalid", "token too large")
    if token.count(".") != 2 or not token.isascii():
        # A compact JWS is base64url and dots (RFC 7515 7.1). A byte past
        # ASCII arrives as a lone surrogate (header values decode with
        # surrogateescape), which PyJWT's encoder raises on, unmapped.
        raise TokenRejected("invalid", "not a compact JWS")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise TokenRejected("invalid", f"bad header: {exc}") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in policy.algorithms or alg not in JWT_ALGORITHMS:
        raise TokenRejected("invalid", f"algorithm {str(alg)[:32]!r} not accepted")
    if header.get("crit") is not None:
        # RFC 7515 4.1.11: we understand no extension, so none may be critical.
        raise TokenRejected("invalid", "unsupported critical header")
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_CHARS):
        raise TokenRejected("invalid", "bad kid")
    candidates: list[tuple[Any, str]]
    if alg in HMAC_ALGORITHMS:
        if not policy.secret:
            raise TokenRejected("invalid", "no secret for HS algorithms")
        candidates = [(policy.secret.encode(), secret_fingerprint(policy.secret))]
    else:
        fitting = [k for k in keys if key_fits(k, alg)]
        if kid is not None:
            chosen = [k for k in fitting if k.kid == kid]
            if not chosen:
                raise UnknownKid(kid)
        else:
            chosen = fitting
        if not chosen:
            # No key of the set fits (an empty set before the first fetch, or a
            # rotation to a new key type): worth a refetch, as an unknown kid is.
            raise UnknownKid(kid or "")
        candidates = [(k.key, k.fingerprint) for k in chosen[:8]]
    options: dict[str, Any] = {
        "require": ["exp"],
        "verify_aud": bool(policy.audiences),
        "verify_iss": policy.issuer is not None,
    }
    last: Exception | None = None
    for key, fingerprint in candidates:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=list(policy.audiences) or None,
                issuer=policy.issuer,
                leeway=policy.leeway,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenRejected("expired", str(exc)) from None
        except jwt.InvalidSignatureError as exc:
            last = exc
            continue  # perhaps another key (no kid, several fit)
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError) as exc:
            raise TokenRejected("invalid", str(exc)[:200]) from None
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise TokenRejected("invalid", "exp is not a number")
        sub = claims.get("sub")
        if sub is not None and not isinstance(sub, str):
            raise TokenRejected("invalid", "sub is not a string")
        identity = Identity(policy.name, sub, token_scopes(claims), claims)
        return Verified(identity, fingerprint, float(exp) + policy.leeway)
    raise TokenRejected("invalid", f"signature: {last}")


def bearer_token(authorization: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>` (RFC 6750 2.1; scheme
    case-insensitive, RFC 9110 11.1), or None."""
    if not authorization:
        return None
    if authorization.startswith("Bearer "):
        # The spelling nearly every client sends: the same answer as the
        # general path below, without its copies (a cached token's budget).
        return authorization[7:].strip() or None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def bearer_challenge(error: str | None = None) -> str:
    if error is None:
        return 'Bearer realm="gateway"'
    return f'Bearer realm="gateway", error="{error}"'


def api_key_challenge(header: str) -> str:
    return f'ApiKey realm="gateway", header="{header}"'
