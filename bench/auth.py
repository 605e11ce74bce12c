"""What identity costs: `python bench/auth.py [--seconds 5] [--rounds 2]`.

1. CPU per request of a JWT route (RS256, one token repeated: the verified
   token cache) and of an API-key route, against the same route without auth,
   in the same gateway process and run (wrk, rounds alternated, medians).
   Targets: JWT at most 1.15x, API key at most 1.10x.
2. The cost of a first-seen token (a full signature check) for RS256, ES256
   and EdDSA, in microseconds, in this process (PyJWT over cryptography, as
   the gateway calls it).
3. 10,000 distinct invalid tokens: the gateway's RSS before and after, and
   valid requests answered 200 throughout.

Everything listens on 127.0.0.1; every run is bounded (wrk -d, timeouts).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    HOST,
    WRK,
    Processes,
    WrkResult,
    cpu_seconds,
    group_pids,
    parse_wrk,
    pin_prefix,
    run_bounded,
    start_gateway,
    start_upstream,
    status_kib,
)
from gateway.core.auth import JwtPolicy, parse_jwks, verify_jwt

API_KEY = "bench-api-key-0123456789abcdefghijklmnopqrstuvwxyz"


def _claims() -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "bench", "aud": "bench", "iat": now, "exp": now + 3600, "scope": "a b"}


def _toml(upstream: int, jwks_path: Path, keys_path: Path) -> Any:
    def toml(port: int, admin: int) -> str:
        return f"""
[server]
listen = ["{HOST}:{port}"]
admin = "{HOST}:{admin}"
access_log = "off"
[auth.jwt]
type = "jwt"
algorithms = ["RS256"]
jwks_file = "{jwks_path}"
audiences = ["bench"]
forward_claims = {{ sub = "X-Auth-Subject" }}
[auth.key]
type = "api_key"
keys_file = "{keys_path}"
forward_consumer = "X-Auth-Consumer"
[upstreams.bench]
targets = ["http://{HOST}:{upstream}"]
[[routes]]
name = "root"
path = "/"
upstream = "bench"
[[routes]]
name = "open"
path = "/open"
upstream = "bench"
[[routes]]
name = "jwt"
path = "/jwt"
upstream = "bench"
auth = "jwt"
[[routes]]
name = "key"
path = "/key"
upstream = "bench"
auth = "key"
"""

    return toml


def _wrk(procs: Processes, url: str, header: str | None, seconds: int, pgid: int) -> WrkResult:
    argv = [*pin_prefix(True), WRK, "-t1", "-c32", f"-d{seconds}s", "--timeout", "5s"]
    if header:
        argv += ["-H", header]
    argv += ["--latency", url]
    result = WrkResult(url=url, connections=32, duration=seconds)
    pids = group_pids(pgid)
    before = cpu_seconds(pids)
    code, out, err = run_bounded(procs, "wrk", argv, timeout=seconds + 20.0)
    result.cpu_s = cpu_seconds(pids) - before
    if code != 0:
        result.failed = err or f"wrk exited {code}"
    return parse_wrk(out, result)


def first_seen_costs(count: int = 200) -> dict[str, float]:
    """µs per full verification of a token never seen before."""
    out: dict[str, float] = {}
    makers: dict[str, tuple[Any, Any]] = {
        "RS256": (rsa.generate_private_key(public_exponent=65537, key_size=2048), RSAAlgorithm),
        "ES256": (ec.generate_private_key(ec.SECP256R1()), ECAlgorithm),
        "EdDSA": (ed25519.Ed25519PrivateKey.generate(), OKPAlgorithm),
    }
    for alg, (private, algorithm) in makers.items():
        jwk = {**algorithm.to_jwk(private.public_key(), as_dict=True), "kid": "k"}
        keys = parse_jwks(json.dumps({"keys": [jwk]}))
        policy = JwtPolicy(name="p", algorithms=(alg,), audiences=("bench",))
        tokens = [
            jwt.encode({**_claims(), "jti": str(i)}, private, algorithm=alg, headers={"kid": "k"})
            for i in range(count)
        ]
        started = time.perf_counter()
        for token in tokens:
            verify_jwt(token, policy, keys, time.time())
        out[alg] = (time.perf_counter() - started) / count * 1e6
    return out


async def flood_invalid(port: int, token: str, count: int) -> tuple[int, int, int]:
    """`count` distinct invalid tokens, 16 at a time, with a valid request
    after every 100; returns (401s, valid 200s, valid non-200s)."""
    base = token[:-8]
    refused = ok = bad = 0
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        url = f"http://{HOST}:{port}/jwt"
        sem = asyncio.Semaphore(16)

        async def one(bearer: str) -> int:
            async with sem, session.get(url, headers={"Authorization": f"Bearer {bearer}"}) as r:
                await r.read()
                return r.status

        for start in range(0, count, 100):
            statuses = await asyncio.gather(
                *(one(f"{base}{i:08d}") for i in range(start, min(start + 100, count)))
            )
            refused += sum(1 for s in statuses if s == 401)
            if await one(token) == 200:
                ok += 1
            else:
                bad += 1
    return refused, ok, bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--invalid", type=int, default=10_000)
    args = parser.parse_args()
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-auth-") as tmpdir:
            tmp = Path(tmpdir)
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = {**RSAAlgorithm.to_jwk(private.public_key(), as_dict=True), "kid": "k"}
            (tmp / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
            digest = hashlib.sha256(API_KEY.encode()).hexdigest()
            (tmp / "keys.toml").write_text(f'[consumers.bench]\nkey_sha256 = "{digest}"\n')
            pem = private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            token = jwt.encode(_claims(), pem, algorithm="RS256", headers={"kid": "k"})
            _, upstream = start_upstream(procs, tmp, True)
            gw = start_gateway(
                procs,
                tmp,
                upstream,
                label="auth",
                loop="auto",
                access_log="off",
                pin=True,
                toml=_toml(upstream, tmp / "jwks.json", tmp / "keys.toml"),
            )
            # "open+token": the open route sent the same Authorization header,
            # so the ratio shows what checking it costs, apart from carrying it.
            names = ("open", "open+token", "jwt", "key")
            runs: dict[str, list[float]] = {name: [] for name in names}
            rps: dict[str, list[float]] = {name: [] for name in names}
            headers = {
                "open": None,
                "open+token": f"Authorization: Bearer {token}",
                "jwt": f"Authorization: Bearer {token}",
                "key": f"X-Api-Key: {API_KEY}",
            }
            for _ in range(args.rounds):
                for name in names:
                    url = f"http://{HOST}:{gw.port}/{name.partition('+')[0]}"
                    result = _wrk(procs, url, headers[name], args.seconds, gw.proc.pid)
                    if result.errors:
                        print(f"{name}: errors {result.non_2xx} {result.failed}", file=sys.stderr)
                    if result.cpu_us_per_request is not None:
                        runs[name].append(result.cpu_us_per_request)
                    rps[name].append(result.rps)
            cpu = {name: statistics.median(values) for name, values in runs.items()}
            print("## CPU per request (gateway process, median of rounds)")
            print()
            print("| route | CPU µs/req | req/s | ratio to open | ratio to open+token |")
            print("|---|---|---|---|---|")
            for name in names:
                print(
                    f"| {name} | {cpu[name]:.1f} | {statistics.median(rps[name]):.0f} "
                    f"| {cpu[name] / cpu['open']:.3f} | {cpu[name] / cpu['open+token']:.3f} |"
                )
            print()
            rss_before = status_kib(gw.proc.pid, "VmRSS")
            refused, ok, bad = asyncio.run(flood_invalid(gw.port, token, args.invalid))
            rss_after = status_kib(gw.proc.pid, "VmRSS")
            print(f"## {args.invalid} distinct invalid tokens")
            print()
            print(
                f"401: {refused}; valid requests between them: {ok} answered 200, {bad} not; "
                f"gateway RSS {rss_before} KiB -> {rss_after} KiB"
            )
            print()
        print("## First-seen token (full verification, this process)")
        print()
        for alg, micros in first_seen_costs().items():
            print(f"- {alg}: {micros:.0f} µs")
    finally:
        procs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
