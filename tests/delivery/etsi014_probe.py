"""Independent conformance probe for ETSI GS QKD 014 V1.1.1 (2019-02).

"Quantum Key Distribution (QKD); Protocol and data format of REST-based key delivery API".

This file is written from the standard, not from the project's code: it imports nothing from
``qkdnode`` and uses only the Python standard library (urllib + ssl, json, base64, uuid).
It is not a pytest module (its name does not start with ``test_``); run it as a script::

    python tests/delivery/etsi014_probe.py --kme-a https://127.0.0.1:8443 \\
        --kme-b https://127.0.0.1:9443 --ca ca.pem \\
        --master-cert m.pem --master-key m.key --master-sae-id SAE_A \\
        --slave-cert s.pem --slave-key s.key --slave-sae-id SAE_B \\
        --stranger-cert x.pem --stranger-key x.key --stranger-sae-id SAE_X

Roles: the master SAE calls ``status`` and ``enc_keys`` at KME A naming the slave SAE; the slave
SAE calls ``dec_keys`` at KME B naming the master SAE.  The stranger is an SAE with a certificate
from the same CA that is registered but not paired with the master.

Clause references (ETSI GS QKD 014 V1.1.1):

* 5.1  API overview: HTTPS, TLS 1.2 or higher, mutual (certificate) authentication of SAE and
       KME, URL form ``https://{KME_hostname}/api/v1/keys/{SAE_ID}/{method}``.
* 5.2  Get status   ``GET  .../{slave_SAE_ID}/status``                       (Table 4: codes)
* 5.3  Get key      ``GET|POST .../{slave_SAE_ID}/enc_keys``  GET params number, size (Table 6)
* 5.4  Get key with key IDs ``GET|POST .../{master_SAE_ID}/dec_keys``  GET param key_ID
       (Table 8).  "The KME shall reject the request with a 401 HTTP status code if the SAE ID
       of the requestor was not an SAE ID supplied to the 'Get key' method each time it was
       called resulting in the return of any of the Key IDs being requested."
       Response codes in all three methods: 200 OK, 400 bad request format, 401 unauthorized,
       503 error of server side; errors carry the Error data format.
* 6.1  Status data format, 6.2 Key request, 6.3 Key container, 6.4 Key IDs, 6.5 Error
       (``message`` string, optional ``details`` array of name/value objects).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import http.client
import json
import re
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

API_PREFIX = "/api/v1/keys"

# Clause 6.3: key_ID is "UUID format (example: "550e8400-e29b-41d4-a716-446655440000")".
_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)

# Clause 6.1: Status data format (all mandatory except status_extension).
_STATUS_STR_FIELDS = ("source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID")
_STATUS_INT_FIELDS = (
    "key_size",
    "stored_key_count",
    "max_key_count",
    "max_key_per_request",
    "max_key_size",
    "min_key_size",
    "max_SAE_ID_count",
)
_STATUS_OPTIONAL = ("status_extension",)

# Clause 6.3: Key container.
_CONTAINER_FIELDS = ("keys", "key_container_extension")
_KEY_FIELDS = ("key_ID", "key_ID_extension", "key", "key_extension")


@dataclass
class ProbeTarget:
    """Where and as whom to probe.  URLs are https base URLs, e.g. https://127.0.0.1:8443."""

    kme_a_url: str
    kme_b_url: str
    ca_file: str
    master_cert: str
    master_key: str
    slave_cert: str
    slave_key: str
    master_sae_id: str
    slave_sae_id: str
    stranger_cert: str
    stranger_key: str
    stranger_sae_id: str
    timeout: float = 15.0
    check_hostname: bool = True


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str


@dataclass
class _Response:
    method: str
    url: str
    status: int
    content_type: str
    body: bytes

    def media_type(self) -> str:
        return self.content_type.split(";", 1)[0].strip().lower()

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))

    def snippet(self, limit: int = 160) -> str:
        text = self.body.decode("utf-8", errors="replace").replace("\n", " ")
        return text if len(text) <= limit else text[:limit] + "..."

    def label(self) -> str:
        path = urllib.parse.urlsplit(self.url)
        query = f"?{path.query}" if path.query else ""
        return f"{self.method} {path.path}{query}"


class _ProbeError(Exception):
    """A precondition of a check could not be established."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe(codes: Iterable[int]) -> str:
    values = sorted(set(codes))
    if values == list(range(400, 500)):
        return "4xx"
    return "/".join(str(v) for v in values)


def _round_up8(bits: int) -> int:
    return max(8, ((bits + 7) // 8) * 8)


class _Http:
    """Minimal HTTPS client with per-role client certificates (clause 5.1: mutual TLS)."""

    def __init__(self, target: ProbeTarget) -> None:
        self.target = target
        self._contexts: dict[str, ssl.SSLContext] = {}

    def context(self, role: str) -> ssl.SSLContext:
        if role in self._contexts:
            return self._contexts[role]
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.target.ca_file)
        ctx.check_hostname = self.target.check_hostname
        pairs: dict[str, tuple[str, str]] = {
            "master": (self.target.master_cert, self.target.master_key),
            "slave": (self.target.slave_cert, self.target.slave_key),
            "stranger": (self.target.stranger_cert, self.target.stranger_key),
        }
        if role in pairs:
            cert, key = pairs[role]
            ctx.load_cert_chain(cert, key)
        elif role != "none":
            raise ValueError(f"unknown role {role!r}")
        self._contexts[role] = ctx
        return ctx

    def call(
        self,
        role: str,
        base_url: str,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        json_body: Any = None,
        raw_body: bytes | None = None,
    ) -> _Response:
        url = base_url.rstrip("/") + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        data: bytes | None = None
        if json_body is not None:
            data = json.dumps(json_body).encode("utf-8")
        if raw_body is not None:
            data = raw_body
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=self.context(role)),
        )
        try:
            with opener.open(request, timeout=self.target.timeout) as reply:
                return _Response(
                    method=method,
                    url=url,
                    status=int(reply.status),
                    content_type=str(reply.headers.get("Content-Type", "")),
                    body=reply.read(),
                )
        except urllib.error.HTTPError as exc:
            body = b""
            try:
                body = exc.read()
            except (OSError, http.client.HTTPException):
                pass
            headers_in = exc.headers
            return _Response(
                method=method,
                url=url,
                status=int(exc.code),
                content_type=str(headers_in.get("Content-Type", "")) if headers_in else "",
                body=body,
            )


def _q(sae_id: str) -> str:
    # Clause 5.2-5.4: "URL-encoded SAE ID" in the path.
    return urllib.parse.quote(sae_id, safe="")


class _Probe:
    def __init__(self, target: ProbeTarget) -> None:
        self.t = target
        self.http = _Http(target)
        self.results: list[CheckResult] = []
        self.status: dict[str, Any] | None = None
        self.issued: list[str] = []  # every key_ID handed out to the master, in order
        self.errors: list[_Response] = []  # every error response (>= 400) seen on the API
        # keys the master obtained and that the slave should be able to fetch, by stage
        self.k_default: dict[str, bytes] = {}
        self.k_get: dict[str, bytes] = {}
        self.k_post: dict[str, bytes] = {}
        self.retrieved: dict[str, bytes] = {}

    # ----------------------------------------------------------------- plumbing

    def check(self, name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        try:
            ok, detail = fn()
        except _ProbeError as exc:
            ok, detail = False, f"precondition failed: {exc}"
        except Exception as exc:  # each check records its own failure, never raises
            ok, detail = False, f"exception: {type(exc).__name__}: {exc}"
        self.results.append(CheckResult(name=name, ok=ok, detail=detail))

    def enc_path(self, slave: str | None = None) -> str:
        return f"{API_PREFIX}/{_q(slave or self.t.slave_sae_id)}/enc_keys"

    def dec_path(self, master: str | None = None) -> str:
        return f"{API_PREFIX}/{_q(master or self.t.master_sae_id)}/dec_keys"

    def status_path(self, slave: str | None = None) -> str:
        return f"{API_PREFIX}/{_q(slave or self.t.slave_sae_id)}/status"

    def master_call(self, method: str, path: str, **kw: Any) -> _Response:
        return self._record(self.http.call("master", self.t.kme_a_url, method, path, **kw))

    def slave_call(self, method: str, path: str, **kw: Any) -> _Response:
        return self._record(self.http.call("slave", self.t.kme_b_url, method, path, **kw))

    def _record(self, resp: _Response) -> _Response:
        if resp.status >= 400:
            self.errors.append(resp)
        return resp

    def need_status(self) -> dict[str, Any]:
        if self.status is None:
            raise _ProbeError(
                "Get status (5.2) did not return a usable Status; cannot derive sizes"
            )
        return self.status

    def explicit_size(self) -> int:
        """min_key_size rounded up to a multiple of 8, if that is <= max_key_size."""
        st = self.need_status()
        size = _round_up8(int(st["min_key_size"]))
        if size > int(st["max_key_size"]):
            size = int(st["key_size"])
        return size

    def pair_number(self) -> int:
        st = self.need_status()
        return max(1, min(2, int(st["max_key_per_request"])))

    # ----------------------------------------------------------------- validators

    def parse_container(self, resp: _Response) -> tuple[list[tuple[str, bytes]], list[str]]:
        """Validate a 200 Key container (clause 6.3); returns (key_ID, key bytes) pairs."""
        problems: list[str] = []
        if resp.status != 200:
            return [], [f"HTTP {resp.status}, expected 200: {resp.snippet()}"]
        if resp.media_type() != "application/json":
            problems.append(f"Content-Type {resp.content_type!r} is not application/json")
        try:
            doc = resp.json()
        except (ValueError, UnicodeDecodeError) as exc:
            return [], [*problems, f"body is not JSON ({exc}): {resp.snippet()}"]
        if not isinstance(doc, dict):
            return [], [*problems, "body is not a JSON object"]
        keys = doc.get("keys")
        if not isinstance(keys, list):
            return [], [*problems, "'keys' missing or not an array"]
        extra = sorted(set(doc) - set(_CONTAINER_FIELDS))
        if extra:
            problems.append(f"unexpected container fields {extra}")
        out: list[tuple[str, bytes]] = []
        for i, item in enumerate(keys):
            if not isinstance(item, dict):
                problems.append(f"keys[{i}] is not an object")
                continue
            key_id = item.get("key_ID")
            key_b64 = item.get("key")
            if not isinstance(key_id, str) or not _UUID_RE.match(key_id):
                problems.append(f"keys[{i}].key_ID {key_id!r} is not a UUID string")
                continue
            if not isinstance(key_b64, str):
                problems.append(f"keys[{i}].key is not a string")
                continue
            try:
                raw = base64.b64decode(key_b64, validate=True)
            except (binascii.Error, ValueError) as exc:
                problems.append(f"keys[{i}].key is not valid base64 ({exc})")
                continue
            extra_k = sorted(set(item) - set(_KEY_FIELDS))
            if extra_k:
                problems.append(f"keys[{i}] has unexpected fields {extra_k}")
            out.append((key_id, raw))
        return out, problems

    def expect_issued(
        self, resp: _Response, number: int, size_bits: int
    ) -> tuple[dict[str, bytes], list[str]]:
        keys, problems = self.parse_container(resp)
        if resp.status == 200 and len(keys) != number:
            problems.append(f"got {len(keys)} well-formed keys, expected {number}")
        for key_id, raw in keys:
            self.issued.append(key_id.lower())
            if len(raw) * 8 != size_bits:
                problems.append(f"key {key_id} is {len(raw) * 8} bits, expected {size_bits}")
        if size_bits >= 64 and len({raw for _, raw in keys}) != len(keys):
            problems.append("identical key material returned for different key_IDs")
        if len({k.lower() for k, _ in keys}) != len(keys):
            problems.append("duplicate key_ID within one container")
        return {k: raw for k, raw in keys}, problems

    def expect_delivered(self, resp: _Response, expected: dict[str, bytes]) -> list[str]:
        keys, problems = self.parse_container(resp)
        got = {k.lower(): raw for k, raw in keys}
        want = {k.lower(): raw for k, raw in expected.items()}
        if resp.status == 200:
            if set(got) != set(want):
                problems.append(f"key_IDs returned {sorted(got)} != requested {sorted(want)}")
            for key_id, raw in want.items():
                if key_id in got and got[key_id] != raw:
                    problems.append(f"key {key_id}: bytes differ from what the master received")
                elif key_id in got:
                    self.retrieved[key_id] = raw
        return problems

    def expect_error(
        self,
        resp: _Response,
        allowed: Iterable[int],
        strict: Iterable[int] | None = None,
        *,
        issuing: bool = False,
    ) -> tuple[bool, str]:
        """Clause 6.5 error: allowed status, application/json, object with string 'message'.

        Returns (ok, text).  If `strict` is given and the status is allowed but not strict,
        the text says which reading the KME followed.  `issuing` marks an enc_keys call, whose
        wrongly returned keys still count as issued for the key_ID uniqueness check.
        """
        allowed_set = set(allowed)
        problems: list[str] = []
        if resp.status not in allowed_set:
            problems.append(f"HTTP {resp.status}, expected {_describe(allowed_set)}")
        problems.extend(self.error_body_problems(resp))
        if resp.status == 200:
            try:
                doc = resp.json()
                if isinstance(doc, dict) and isinstance(doc.get("keys"), list) and doc["keys"]:
                    problems.append(f"returned {len(doc['keys'])} keys")
                    for item in doc["keys"] if issuing else []:
                        if isinstance(item, dict) and isinstance(item.get("key_ID"), str):
                            self.issued.append(item["key_ID"].lower())
            except (ValueError, UnicodeDecodeError):
                pass
        text = f"{resp.label()} -> HTTP {resp.status} {resp.snippet(100)}"
        if strict is not None and resp.status in allowed_set and resp.status not in set(strict):
            text += f" (accepted; strict reading expects {_describe(strict)})"
        if problems:
            return False, text + " | " + "; ".join(problems)
        return True, text

    @staticmethod
    def error_body_problems(resp: _Response) -> list[str]:
        if resp.status < 400:
            return []
        problems: list[str] = []
        if resp.media_type() != "application/json":
            problems.append(f"Content-Type {resp.content_type!r} is not application/json")
        try:
            doc = resp.json()
        except (ValueError, UnicodeDecodeError):
            return [*problems, "error body is not JSON"]
        if not isinstance(doc, dict):
            return [*problems, "error body is not a JSON object"]
        if not isinstance(doc.get("message"), str):
            problems.append("error body lacks a string 'message'")
        if "details" in doc and not isinstance(doc["details"], list):
            problems.append("'details' present but not an array")
        if "keys" in doc:
            problems.append("error body carries 'keys'")
        return problems

    def issue(self, number: int = 1) -> dict[str, bytes]:
        """Precondition helper: the master obtains fresh keys (default size) at KME A."""
        st = self.need_status()
        resp = self.master_call("GET", self.enc_path(), query={"number": str(number)})
        keys, problems = self.expect_issued(resp, number, int(st["key_size"]))
        if problems:
            raise _ProbeError("could not obtain keys for the precondition: " + "; ".join(problems))
        return keys

    # ----------------------------------------------------------------- checks

    def c_tls_version(self) -> tuple[bool, str]:
        # Clause 5.1: HTTPS with TLS version 1.2 or higher.
        notes: list[str] = []
        ok = True
        for label, base in (("A", self.t.kme_a_url), ("B", self.t.kme_b_url)):
            parts = urllib.parse.urlsplit(base)
            host = parts.hostname or "localhost"
            port = parts.port or 443
            role = "master" if label == "A" else "slave"
            ctx = self.http.context(role)
            with (
                socket.create_connection((host, port), timeout=self.t.timeout) as raw,
                ctx.wrap_socket(raw, server_hostname=host) as tls,
            ):
                version = tls.version() or "?"
            notes.append(f"KME {label}: {version}")
            if version not in ("TLSv1.2", "TLSv1.3"):
                ok = False
        notes.append("(client offers >= TLS 1.2 only, so this checks what was negotiated)")
        return ok, "; ".join(notes)

    def c_status(self) -> tuple[bool, str]:
        # Clause 5.2 (Get status) and 6.1 (Status data format).
        resp = self.master_call("GET", self.status_path())
        if resp.status != 200:
            return False, f"HTTP {resp.status}: {resp.snippet()}"
        problems: list[str] = []
        notes: list[str] = []
        if resp.media_type() != "application/json":
            problems.append(f"Content-Type {resp.content_type!r} is not application/json")
        doc = resp.json()
        if not isinstance(doc, dict):
            return False, "status body is not a JSON object"
        for name in _STATUS_STR_FIELDS:
            if not isinstance(doc.get(name), str) or not doc[name]:
                problems.append(f"{name} missing or not a non-empty string: {doc.get(name)!r}")
        for name in _STATUS_INT_FIELDS:
            if not _is_int(doc.get(name)):
                problems.append(f"{name} missing or not an integer: {doc.get(name)!r}")
        extra = sorted(set(doc) - set(_STATUS_STR_FIELDS) - set(_STATUS_INT_FIELDS))
        extra = [e for e in extra if e not in _STATUS_OPTIONAL]
        if extra:
            notes.append(f"unexpected fields {extra}")
        if "status_extension" in doc and not isinstance(doc["status_extension"], dict):
            notes.append("status_extension is not an object (6.1 types it as object)")
        if problems:
            return False, "; ".join(problems)
        if doc["master_SAE_ID"] != self.t.master_sae_id:
            problems.append(
                f"master_SAE_ID {doc['master_SAE_ID']!r} != caller {self.t.master_sae_id!r}"
            )
        if doc["slave_SAE_ID"] != self.t.slave_sae_id:
            problems.append(
                f"slave_SAE_ID {doc['slave_SAE_ID']!r} != requested {self.t.slave_sae_id!r}"
            )
        if doc["source_KME_ID"] == doc["target_KME_ID"]:
            problems.append("source_KME_ID equals target_KME_ID")
        ks, mn, mx = doc["key_size"], doc["min_key_size"], doc["max_key_size"]
        if ks <= 0 or ks % 8:
            problems.append(f"key_size {ks} is not a positive multiple of 8")
        if not 0 < mn <= ks <= mx:
            problems.append(f"expected 0 < min_key_size {mn} <= key_size {ks} <= max {mx}")
        if doc["max_key_per_request"] < 1:
            problems.append(f"max_key_per_request {doc['max_key_per_request']} < 1")
        if not 0 <= doc["stored_key_count"] <= doc["max_key_count"]:
            problems.append(
                f"stored_key_count {doc['stored_key_count']} not in "
                f"[0, max_key_count {doc['max_key_count']}]"
            )
        if doc["max_SAE_ID_count"] < 0:
            problems.append(f"max_SAE_ID_count {doc['max_SAE_ID_count']} < 0")
        if mn % 8 or mx % 8:
            notes.append("min/max_key_size not multiples of 8 (allowed; 6.1 does not say)")
        self.status = doc
        summary = (
            f"KME {doc['source_KME_ID']}->{doc['target_KME_ID']} key_size={ks} "
            f"min={mn} max={mx} per_request={doc['max_key_per_request']} "
            f"stored={doc['stored_key_count']}/{doc['max_key_count']} "
            f"max_SAE_ID_count={doc['max_SAE_ID_count']}"
        )
        text = "; ".join([summary, *problems, *notes])
        return not problems, text

    def c_enc_get_default(self) -> tuple[bool, str]:
        # Clause 5.3: GET without parameters -> number defaults to 1, size to key_size (6.2).
        st = self.need_status()
        resp = self.master_call("GET", self.enc_path())
        keys, problems = self.expect_issued(resp, 1, int(st["key_size"]))
        self.k_default = keys
        if problems:
            return False, "; ".join(problems)
        return True, f"1 key of {st['key_size']} bits, key_ID {next(iter(keys))}"

    def c_enc_get_number_size(self) -> tuple[bool, str]:
        # Clause 5.3: GET with query parameters number and size.
        size, number = self.explicit_size(), self.pair_number()
        query = {"number": str(number), "size": str(size)}
        resp = self.master_call("GET", self.enc_path(), query=query)
        keys, problems = self.expect_issued(resp, number, size)
        self.k_get = keys
        if problems:
            return False, f"{resp.label()}: " + "; ".join(problems)
        return True, f"{resp.label()}: {number} keys of {size} bits"

    def c_enc_post_number_size(self) -> tuple[bool, str]:
        # Clause 5.3 POST with Key request (6.2) body.
        size, number = self.explicit_size(), self.pair_number()
        resp = self.master_call("POST", self.enc_path(), json_body={"number": number, "size": size})
        keys, problems = self.expect_issued(resp, number, size)
        self.k_post = keys
        if problems:
            return False, "; ".join(problems)
        return True, f"POST {{number: {number}, size: {size}}}: {number} keys of {size} bits"

    def c_dec_get(self) -> tuple[bool, str]:
        # Clause 5.4: GET .../{master_SAE_ID}/dec_keys?key_ID=... at the slave's KME.
        targets = dict(self.k_default)
        if self.k_post:
            first = next(iter(self.k_post))
            targets[first] = self.k_post[first]
        if not targets:
            return False, "no keys were issued to retrieve"
        notes: list[str] = []
        ok = True
        for key_id, raw in targets.items():
            resp = self.slave_call("GET", self.dec_path(), query={"key_ID": key_id})
            problems = self.expect_delivered(resp, {key_id: raw})
            if problems:
                ok = False
                notes.append(f"{key_id}: " + "; ".join(problems))
            else:
                notes.append(f"{key_id}: same {len(raw) * 8} bits")
        return ok, "; ".join(notes)

    def c_dec_post(self) -> tuple[bool, str]:
        # Clause 5.4 POST with Key IDs (6.4) body {"key_IDs": [{"key_ID": ...}, ...]}.
        notes: list[str] = []
        ok = True
        batches: list[dict[str, bytes]] = []
        if self.k_get:
            batches.append(dict(self.k_get))
        rest = {k: v for k, v in self.k_post.items() if k.lower() not in self.retrieved}
        if rest:
            batches.append(rest)
        if not batches:
            return False, "no keys were issued to retrieve"
        for batch in batches:
            body = {"key_IDs": [{"key_ID": k} for k in batch]}
            resp = self.slave_call("POST", self.dec_path(), json_body=body)
            problems = self.expect_delivered(resp, batch)
            if problems:
                ok = False
                notes.append(f"{len(batch)} IDs: " + "; ".join(problems))
            else:
                notes.append(f"{len(batch)} IDs in one POST: same bytes")
        return ok, "; ".join(notes)

    def c_dec_second(self) -> tuple[bool, str]:
        # Not stated explicitly by 014 V1.1.1: after delivery to the slave a key should be gone,
        # so a second request is a 400 ("One or more keys specified are not found on KME").
        done = list(self.retrieved)
        if not done:
            return False, "no key was retrieved by the slave, nothing to re-request"
        notes: list[str] = []
        ok = True
        resp = self.slave_call("GET", self.dec_path(), query={"key_ID": done[0]})
        good, text = self.expect_error(resp, range(400, 500), strict=[400])
        ok &= good
        notes.append(text)
        if len(done) > 1:
            body = {"key_IDs": [{"key_ID": done[-1]}]}
            resp = self.slave_call("POST", self.dec_path(), json_body=body)
            good, text = self.expect_error(resp, range(400, 500), strict=[400])
            ok &= good
            notes.append(text)
        return ok, " || ".join(notes)

    def c_dec_stranger(self) -> tuple[bool, str]:
        # Clause 5.4: the requestor's SAE ID was not supplied to Get key -> 401.
        keys = self.issue(1)
        key_id, raw = next(iter(keys.items()))
        notes: list[str] = []
        ok = True
        for method in ("GET", "POST"):
            kw: dict[str, Any] = (
                {"query": {"key_ID": key_id}}
                if method == "GET"
                else {"json_body": {"key_IDs": [{"key_ID": key_id}]}}
            )
            resp = self._record(
                self.http.call("stranger", self.t.kme_b_url, method, self.dec_path(), **kw)
            )
            good, text = self.expect_error(resp, [400, 401], strict=[401])
            ok &= good
            notes.append(text)
        after = self.slave_call("GET", self.dec_path(), query={"key_ID": key_id})
        if not self.expect_delivered(after, {key_id: raw}):
            notes.append("slave still retrieves the key afterwards (same bytes)")
        else:
            notes.append(f"note: slave could not retrieve the key afterwards (HTTP {after.status})")
        return ok, " || ".join(notes)

    def c_dec_wrong_master(self) -> tuple[bool, str]:
        # Clause 5.4: keys are those "previously delivered to a remote master SAE"; naming a
        # different master in the URL must not deliver them.
        keys = self.issue(1)
        key_id, raw = next(iter(keys.items()))
        resp = self.slave_call(
            "GET", self.dec_path(self.t.stranger_sae_id), query={"key_ID": key_id}
        )
        ok, text = self.expect_error(resp, [400, 401])
        after = self.slave_call("GET", self.dec_path(), query={"key_ID": key_id})
        if not self.expect_delivered(after, {key_id: raw}):
            text += " || right master afterwards: delivered, same bytes"
        else:
            text += f" || note: right master afterwards got HTTP {after.status}"
        return ok, text

    def c_enc_stranger(self) -> tuple[bool, str]:
        # Clause 5.3/5.1: an SAE not paired with the slave must not get keys for it (401;
        # 400 accepted).  Tried at both KMEs since the stranger may be attached to either.
        notes: list[str] = []
        ok = True
        for label, base in (("A", self.t.kme_a_url), ("B", self.t.kme_b_url)):
            resp = self._record(self.http.call("stranger", base, "GET", self.enc_path()))
            good, text = self.expect_error(resp, [400, 401], strict=[401], issuing=True)
            ok &= good
            notes.append(f"KME {label}: {text}")
        return ok, " || ".join(notes)

    def c_dec_unknown(self) -> tuple[bool, str]:
        # Clause 5.4 / 6.4: unknown key_ID -> 400 ("One or more keys specified are not found").
        notes: list[str] = []
        ok = True
        resp = self.slave_call("GET", self.dec_path(), query={"key_ID": str(uuid.uuid4())})
        good, text = self.expect_error(resp, [400])
        ok &= good
        notes.append(text)
        body = {"key_IDs": [{"key_ID": str(uuid.uuid4())}]}
        resp = self.slave_call("POST", self.dec_path(), json_body=body)
        good, text = self.expect_error(resp, [400])
        ok &= good
        notes.append(text)
        return ok, " || ".join(notes)

    def c_dec_malformed(self) -> tuple[bool, str]:
        # Clause 5.4 Table 8: 400 "Bad request format".
        cases: list[tuple[str, dict[str, Any]]] = [
            ("GET", {}),
            ("GET", {"query": {"key_ID": "not-a-uuid"}}),
            ("POST", {"json_body": {"key_IDs": "oops"}}),
            ("POST", {"raw_body": b'{"key_IDs": [{"key_ID": '}),
        ]
        notes: list[str] = []
        ok = True
        for method, kw in cases:
            resp = self.slave_call(method, self.dec_path(), **kw)
            good, text = self.expect_error(resp, [400])
            ok &= good
            notes.append(text)
        return ok, " || ".join(notes)

    def _enc_reject(self, query: dict[str, str]) -> tuple[bool, str]:
        resp = self.master_call("GET", self.enc_path(), query=query)
        return self.expect_error(resp, [400], issuing=True)

    def c_number_zero(self) -> tuple[bool, str]:
        # 6.2: number of keys requested; 0 is not a meaningful request (Table 6: 400).
        return self._enc_reject({"number": "0"})

    def c_number_negative(self) -> tuple[bool, str]:
        return self._enc_reject({"number": "-1"})

    def c_number_not_int(self) -> tuple[bool, str]:
        return self._enc_reject({"number": "abc"})

    def c_size_not_8(self) -> tuple[bool, str]:
        # Example error message in the standard: "size shall be a multiple of 8".
        return self._enc_reject({"size": "7"})

    def c_size_above_max(self) -> tuple[bool, str]:
        st = self.need_status()
        size = (int(st["max_key_size"]) // 8 + 1) * 8
        return self._enc_reject({"size": str(size)})

    def c_number_above_max(self) -> tuple[bool, str]:
        # 6.1: max_key_per_request is the "Maximum number of keys per request".
        st = self.need_status()
        return self._enc_reject({"number": str(int(st["max_key_per_request"]) + 1)})

    def c_post_malformed(self) -> tuple[bool, str]:
        resp = self.master_call("POST", self.enc_path(), raw_body=b'{"number": 1, "size": ')
        return self.expect_error(resp, [400], issuing=True)

    def c_ext_mandatory(self) -> tuple[bool, str]:
        # 6.2: extension_mandatory = parameters "that KME shall handle or return an error".
        body = {"number": 1, "extension_mandatory": [{"probe_unsupported_extension_x9": True}]}
        resp = self.master_call("POST", self.enc_path(), json_body=body)
        return self.expect_error(resp, [400], issuing=True)

    def c_ext_optional(self) -> tuple[bool, str]:
        # 6.2: extension_optional = parameters "that KME may ignore".  Either ignoring (200 with
        # one key) or refusing with a proper 400 error is a defensible reading.
        st = self.need_status()
        body = {"number": 1, "extension_optional": [{"probe_unknown_optional_x9": True}]}
        resp = self.master_call("POST", self.enc_path(), json_body=body)
        if resp.status == 200:
            keys, problems = self.expect_issued(resp, 1, int(st["key_size"]))
            if problems:
                return False, "; ".join(problems)
            return True, "unknown extension_optional ignored; 1 key issued"
        ok, text = self.expect_error(resp, [400], issuing=True)
        return ok, "refused rather than ignored (6.2 says KME may ignore): " + text

    def c_additional_slaves(self) -> tuple[bool, str]:
        # 6.2 additional_slave_SAE_IDs: "two or more slave SAEs to share identical keys. The
        # maximum number of IDs is defined as max_SAE_ID_count" (6.1: "0" when no multicast).
        st = self.need_status()
        count = int(st["max_SAE_ID_count"])
        body = {"number": 1, "additional_slave_SAE_IDs": [self.t.stranger_sae_id]}
        resp = self.master_call("POST", self.enc_path(), json_body=body)
        if count == 0:
            ok, text = self.expect_error(resp, [400, 401], strict=[400], issuing=True)
            return ok, f"max_SAE_ID_count=0, additional slave requested: {text}"
        if resp.status == 200:
            keys, problems = self.expect_issued(resp, 1, int(st["key_size"]))
            if problems:
                return False, f"max_SAE_ID_count={count}: " + "; ".join(problems)
            return True, (
                f"max_SAE_ID_count={count}: KME issued a key shared with the stranger as "
                "additional slave (pairing must allow it; tolerated)"
            )
        ok, text = self.expect_error(resp, [400, 401], issuing=True)
        return ok, f"max_SAE_ID_count={count}: stranger refused as additional slave: {text}"

    def c_no_client_cert(self) -> tuple[bool, str]:
        # Clause 5.1: SAE and KME authenticate each other (client certificate required).
        notes: list[str] = []
        ok = True
        for label, base in (("A", self.t.kme_a_url), ("B", self.t.kme_b_url)):
            try:
                resp = self.http.call("none", base, "GET", self.status_path())
            except Exception as exc:
                reason: Any = exc.reason if isinstance(exc, urllib.error.URLError) else exc
                refused = isinstance(
                    reason, ConnectionRefusedError | socket.gaierror | TimeoutError
                )
                tls_reject = isinstance(
                    reason, ssl.SSLError | ConnectionResetError | BrokenPipeError
                ) or isinstance(exc, ssl.SSLError | http.client.RemoteDisconnected)
                if tls_reject and not refused:
                    how = (
                        "connection closed without an HTTP response"
                        if isinstance(reason, http.client.RemoteDisconnected)
                        else "TLS refused"
                    )
                    notes.append(f"KME {label}: {how} ({type(reason).__name__}: {reason})")
                else:
                    ok = False
                    notes.append(f"KME {label}: unexpected {type(exc).__name__}: {reason}")
                continue
            if resp.status == 401:
                good, text = self.expect_error(resp, [401])
                self.errors.append(resp)
                ok &= good
                notes.append(f"KME {label}: {text}")
            else:
                ok = False
                notes.append(f"KME {label}: HTTP {resp.status} without client certificate")
        return ok, " || ".join(notes)

    def c_unknown_path(self) -> tuple[bool, str]:
        # Not covered by 014: a 4xx, and a JSON body if there is a body at all.
        notes: list[str] = []
        ok = True
        paths = [f"{API_PREFIX}/{_q(self.t.slave_sae_id)}/no_such_method", "/api/v1/no_such_thing"]
        for path in paths:
            resp = self.http.call("master", self.t.kme_a_url, "GET", path)
            text = f"GET {path} -> HTTP {resp.status} {resp.snippet(80)}"
            if not 400 <= resp.status < 500:
                ok = False
                text += " (expected 4xx)"
            if resp.body.strip():
                try:
                    resp.json()
                    if resp.media_type() != "application/json":
                        text += f" (Content-Type {resp.content_type!r})"
                        ok = False
                except (ValueError, UnicodeDecodeError):
                    ok = False
                    text += " (body is not JSON)"
            notes.append(text)
        return ok, " || ".join(notes)

    def c_unique(self) -> tuple[bool, str]:
        # 6.3: key_ID identifies a key; UUIDs must not repeat across requests.
        if not self.issued:
            return False, "no key_IDs were issued"
        dupes = sorted({k for k in self.issued if self.issued.count(k) > 1})
        if dupes:
            return False, f"{len(dupes)} duplicate key_IDs across calls: {dupes[:3]}"
        return True, f"{len(self.issued)} key_IDs, all distinct"

    def c_errors_json(self) -> tuple[bool, str]:
        # 5.2-5.4 + 6.5: every 400/401/503 carries the Error data format as JSON.
        if not self.errors:
            return False, "no error responses were observed"
        bad: list[str] = []
        for resp in self.errors:
            problems = self.error_body_problems(resp)
            if problems:
                bad.append(f"{resp.label()} HTTP {resp.status}: " + "; ".join(problems))
        statuses = sorted({r.status for r in self.errors})
        if bad:
            return False, f"{len(bad)}/{len(self.errors)} bad: " + " || ".join(bad[:5])
        return True, f"{len(self.errors)} error responses (statuses {statuses}), all JSON"

    # ----------------------------------------------------------------- driver

    def run(self) -> list[CheckResult]:
        steps: list[tuple[str, Callable[[], tuple[bool, str]]]] = [
            ("tls_version_min_1_2", self.c_tls_version),
            ("status_fields", self.c_status),
            ("enc_keys_get_default", self.c_enc_get_default),
            ("enc_keys_get_number_size", self.c_enc_get_number_size),
            ("enc_keys_post_number_size", self.c_enc_post_number_size),
            ("dec_keys_get_matches", self.c_dec_get),
            ("dec_keys_post_matches", self.c_dec_post),
            ("dec_keys_second_retrieval_rejected", self.c_dec_second),
            ("dec_keys_stranger_rejected", self.c_dec_stranger),
            ("dec_keys_wrong_master_rejected", self.c_dec_wrong_master),
            ("enc_keys_stranger_rejected", self.c_enc_stranger),
            ("dec_keys_unknown_id_rejected", self.c_dec_unknown),
            ("dec_keys_malformed_request_rejected", self.c_dec_malformed),
            ("enc_keys_number_zero_rejected", self.c_number_zero),
            ("enc_keys_number_negative_rejected", self.c_number_negative),
            ("enc_keys_number_not_integer_rejected", self.c_number_not_int),
            ("enc_keys_size_not_multiple_of_8_rejected", self.c_size_not_8),
            ("enc_keys_size_above_max_rejected", self.c_size_above_max),
            ("enc_keys_number_above_max_per_request_rejected", self.c_number_above_max),
            ("enc_keys_post_malformed_json_rejected", self.c_post_malformed),
            ("enc_keys_extension_mandatory_unsupported_rejected", self.c_ext_mandatory),
            ("extra_extension_optional_ignored", self.c_ext_optional),
            ("enc_keys_additional_slave_sae_ids", self.c_additional_slaves),
            ("no_client_cert_rejected", self.c_no_client_cert),
            ("extra_unknown_path_json", self.c_unknown_path),
            ("key_ids_unique", self.c_unique),
            ("error_responses_json", self.c_errors_json),
        ]
        for name, fn in steps:
            self.check(name, fn)
        return self.results


def run_probe(target: ProbeTarget) -> list[CheckResult]:
    """Run every check against the KME pair; never raises for a failing KME."""
    return _Probe(target).run()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ETSI GS QKD 014 V1.1.1 conformance probe")
    p.add_argument("--kme-a", required=True, help="https base URL of the master's KME")
    p.add_argument("--kme-b", required=True, help="https base URL of the slave's KME")
    p.add_argument("--ca", required=True, help="CA bundle that signed the KME certificates")
    p.add_argument("--master-cert", required=True)
    p.add_argument("--master-key", required=True)
    p.add_argument("--master-sae-id", required=True)
    p.add_argument("--slave-cert", required=True)
    p.add_argument("--slave-key", required=True)
    p.add_argument("--slave-sae-id", required=True)
    p.add_argument("--stranger-cert", required=True)
    p.add_argument("--stranger-key", required=True)
    p.add_argument("--stranger-sae-id", required=True)
    p.add_argument("--timeout", type=float, default=15.0)
    p.add_argument(
        "--no-check-hostname",
        action="store_true",
        help="verify the KME certificate chain but not its hostname/IP",
    )
    p.add_argument(
        "--ignore-extra",
        action="store_true",
        help="do not let failing extra_* checks affect the exit status",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    target = ProbeTarget(
        kme_a_url=args.kme_a,
        kme_b_url=args.kme_b,
        ca_file=args.ca,
        master_cert=args.master_cert,
        master_key=args.master_key,
        slave_cert=args.slave_cert,
        slave_key=args.slave_key,
        master_sae_id=args.master_sae_id,
        slave_sae_id=args.slave_sae_id,
        stranger_cert=args.stranger_cert,
        stranger_key=args.stranger_key,
        stranger_sae_id=args.stranger_sae_id,
        timeout=args.timeout,
        check_hostname=not args.no_check_hostname,
    )
    results = run_probe(target)
    failed = 0
    for r in results:
        print(f"{'PASS' if r.ok else 'FAIL'} {r.name}: {r.detail}")
        if not r.ok and not (args.ignore_extra and r.name.startswith("extra_")):
            failed += 1
    print(f"{len(results) - sum(not r.ok for r in results)}/{len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
