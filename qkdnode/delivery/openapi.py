"""The OpenAPI 3.1 document of the ETSI GS QKD 014 interface this KME serves.

The server publishes it at ``/api/v1/openapi.json``; ``docs/openapi.json`` is a copy made
with ``python -c "from qkdnode.delivery.openapi import openapi_json as j; print(j(), end='')"
> docs/openapi.json`` (a test checks they match).
"""

from __future__ import annotations

import json
from typing import Any

API_PREFIX = "/api/v1"
OPENAPI_PATH = f"{API_PREFIX}/openapi.json"

_ERR = {"$ref": "#/components/schemas/Error"}


def _responses(ok_schema: str) -> dict[str, Any]:
    def err(text: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "description": text,
            "content": {"application/json": {"schema": _ERR}},
        }
        if headers:
            out["headers"] = headers
        return out

    retry = {
        "Retry-After": {
            "description": "seconds to wait before retrying",
            "schema": {"type": "integer", "minimum": 1},
        }
    }
    return {
        "200": {
            "description": "Successful response",
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{ok_schema}"}}
            },
        },
        "400": err(
            "Bad request: invalid query value or body (number < 1, non-integer, size not a "
            "multiple of 8 or out of [min_key_size, max_key_size], too many keys or additional "
            "slaves, malformed JSON), unknown SAE ID, unsupported mandatory extension; for "
            "dec_keys, one answer for every key ID the caller cannot have (never issued, "
            "issued to another pair, already delivered, expired)"
        ),
        "401": err(
            "Unauthorized: the client certificate names no registered SAE, is revoked, or "
            "its SAE is not in a pair served here with the named SAE"
        ),
        "404": err("No such resource"),
        "405": err("Method not allowed (see the Allow header)"),
        "413": err("Request body larger than 262144 bytes"),
        "503": err(
            "Not now, retry after Retry-After seconds: not enough keys, the peer KME did not "
            "confirm the activation (unreachable or synchronising), this KME is not yet in "
            "step with its peer after a start or reconnection, or the key's block is not yet "
            "committed here",
            retry,
        ),
    }


def _sae_param(name: str, text: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": text,
        "schema": {"type": "string"},
    }


def build_openapi() -> dict[str, Any]:
    """The OpenAPI document (a plain JSON-compatible dict)."""
    slave = _sae_param("slave_SAE_ID", "ID of the slave SAE of the caller's pair")
    master = _sae_param("master_SAE_ID", "ID of the master SAE of the caller's pair")
    ext_list = {"type": "array", "items": {"type": "object"}}
    schemas: dict[str, Any] = {
        "Status": {
            "type": "object",
            "required": [
                "source_KME_ID",
                "target_KME_ID",
                "master_SAE_ID",
                "slave_SAE_ID",
                "key_size",
                "stored_key_count",
                "max_key_count",
                "max_key_per_request",
                "max_key_size",
                "min_key_size",
                "max_SAE_ID_count",
            ],
            "properties": {
                "source_KME_ID": {"type": "string"},
                "target_KME_ID": {"type": "string"},
                "master_SAE_ID": {"type": "string"},
                "slave_SAE_ID": {"type": "string"},
                "key_size": {"type": "integer", "description": "default key size (bits)"},
                "stored_key_count": {
                    "type": "integer",
                    "description": "keys of key_size bits enc_keys can hand out now",
                },
                "max_key_count": {"type": "integer"},
                "max_key_per_request": {"type": "integer"},
                "max_key_size": {
                    "type": "integer",
                    "description": "bits; keys longer than key_size concatenate stored keys",
                },
                "min_key_size": {"type": "integer", "description": "bits"},
                "max_SAE_ID_count": {
                    "type": "integer",
                    "description": "most additional_slave_SAE_IDs in one request (0: none)",
                },
                "status_extension": {"type": "object"},
            },
        },
        "KeyRequest": {
            "type": "object",
            "properties": {
                "number": {"type": "integer", "minimum": 1, "default": 1},
                "size": {
                    "type": "integer",
                    "minimum": 8,
                    "description": "key size in bits, a multiple of 8 (default: key_size)",
                },
                "additional_slave_SAE_IDs": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "further slaves (each paired with the master here) that "
                    "may each fetch the same keys once with dec_keys at the peer KME",
                },
                "extension_mandatory": ext_list,
                "extension_optional": ext_list,
            },
        },
        "KeyIDs": {
            "type": "object",
            "required": ["key_IDs"],
            "properties": {
                "key_IDs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["key_ID"],
                        "properties": {
                            "key_ID": {"type": "string", "format": "uuid"},
                            "key_ID_extension": {"type": "object"},
                        },
                    },
                },
                "key_IDs_extension": {"type": "object"},
            },
        },
        "KeyContainer": {
            "type": "object",
            "required": ["keys"],
            "properties": {
                "keys": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["key_ID", "key"],
                        "properties": {
                            "key_ID": {"type": "string", "format": "uuid"},
                            "key_ID_extension": {"type": "object"},
                            "key": {"type": "string", "format": "byte", "description": "base64"},
                            "key_extension": {"type": "object"},
                        },
                    },
                },
                "key_container_extension": {"type": "object"},
            },
        },
        "Error": {
            "type": "object",
            "required": ["message"],
            "properties": {
                "message": {"type": "string"},
                "details": {"type": "array", "items": {"type": "object"}},
            },
        },
    }
    keys = f"{API_PREFIX}/keys"
    paths: dict[str, Any] = {
        f"{keys}/{{slave_SAE_ID}}/status": {
            "get": {
                "operationId": "getStatus",
                "summary": "Status of the keys the caller (master SAE) can get for the pair",
                "parameters": [slave],
                "responses": _responses("Status"),
            }
        },
        f"{keys}/{{slave_SAE_ID}}/enc_keys": {
            "get": {
                "operationId": "getKey",
                "summary": "Get keys (master SAE)",
                "parameters": [
                    slave,
                    {
                        "name": "number",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "default": 1},
                    },
                    {
                        "name": "size",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 8, "multipleOf": 8},
                    },
                ],
                "responses": _responses("KeyContainer"),
            },
            "post": {
                "operationId": "postKey",
                "summary": "Get keys (master SAE)",
                "parameters": [slave],
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/KeyRequest"}}
                    },
                },
                "responses": _responses("KeyContainer"),
            },
        },
        f"{keys}/{{master_SAE_ID}}/dec_keys": {
            "get": {
                "operationId": "getKeyWithIDs",
                "summary": "Get the keys with the given ID (slave SAE)",
                "parameters": [
                    master,
                    {
                        "name": "key_ID",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string", "format": "uuid"},
                    },
                ],
                "responses": _responses("KeyContainer"),
            },
            "post": {
                "operationId": "postKeyWithIDs",
                "summary": "Get the keys with the given IDs (slave SAE)",
                "parameters": [master],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/KeyIDs"}}
                    },
                },
                "responses": _responses("KeyContainer"),
            },
        },
        OPENAPI_PATH: {
            "get": {
                "operationId": "getOpenApi",
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI document"}},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "qkdnode key delivery (ETSI GS QKD 014 V1.1.1)",
            "version": "1.0.0",
            "description": "REST over HTTPS with mutual TLS. SAEs are identified by the CN "
            "(or a DNS SAN) of their client certificate. Key sizes are in bits; keys are "
            "base64. Key IDs returned by enc_keys on one KME are redeemed with dec_keys on the "
            "other; enc_keys answers only after the other KME has durably reserved the keys "
            "for the master and its slaves, so dec_keys succeeds at once. Every error body is "
            '{"message": string, "details"?: array}.',
        },
        "servers": [{"url": "/"}],
        "security": [{"mutualTLS": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"mutualTLS": {"type": "mutualTLS"}},
        },
    }


def openapi_json() -> str:
    """The document as published (stable key order, 2-space indent, final newline)."""
    return json.dumps(build_openapi(), indent=2, sort_keys=True) + "\n"
