"""Key delivery to SAEs: ETSI GS QKD 014 over HTTPS with mutual TLS, and a test PKI."""

from qkdnode.delivery.etsi import EtsiApi, EtsiServer, build_app, start_etsi_server
from qkdnode.delivery.openapi import build_openapi, openapi_json

__all__ = [
    "EtsiApi",
    "EtsiServer",
    "build_app",
    "build_openapi",
    "openapi_json",
    "start_etsi_server",
]
