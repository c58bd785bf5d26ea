"""``qkdnode pki init|issue|revoke``: a test CA, certificates and a CRL for local ETSI 014 runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qkdnode.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from qkdnode.delivery.pki import PkiError, init_ca, issue_cert, revoke_cert


def register(sub: Any) -> None:
    p = sub.add_parser("pki", help="create a test CA and TLS certificates for key delivery")
    psub = p.add_subparsers(dest="pki_command", metavar="ACTION", required=True)
    init = psub.add_parser("init", help="create a test CA (ca.crt, ca.key) in --out")
    init.add_argument("--out", required=True, type=Path, help="directory for the CA files")
    init.add_argument("--cn", default="qkdnode test CA", help="CA common name")
    init.add_argument("--days", type=int, default=3650, help="validity in days")
    init.set_defaults(func=_init)
    issue = psub.add_parser("issue", help="issue a certificate signed by the test CA")
    issue.add_argument("--out", required=True, type=Path, help="directory for NAME.crt/NAME.key")
    issue.add_argument("--ca", type=Path, default=None, help="CA directory (default: --out)")
    issue.add_argument("--cn", required=True, help="common name (an SAE's certificate_cn)")
    issue.add_argument("--server", action="store_true", help="server certificate (KME)")
    issue.add_argument(
        "--san", action="append", default=[], help="subject alt name (IP or DNS), repeatable"
    )
    issue.add_argument("--days", type=int, default=825, help="validity in days")
    issue.set_defaults(func=_issue)
    revoke = psub.add_parser(
        "revoke", help="add NAME.crt to the CA's CRL (crl.pem, created if absent) in --out"
    )
    revoke.add_argument(
        "--out", required=True, type=Path, help="directory of the CA, NAME.crt and crl.pem"
    )
    revoke.add_argument("--cn", required=True, help="common name of the certificate to revoke")
    revoke.set_defaults(func=_revoke)


def _init(args: argparse.Namespace) -> int:
    if args.days < 1:
        print("--days must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        files = init_ca(args.out, common_name=args.cn, days=args.days)
    except (PkiError, OSError) as exc:
        print(f"pki init: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"CA certificate {files.cert_file}\nCA key         {files.key_file} (mode 0600)")
    return EXIT_OK


def _issue(args: argparse.Namespace) -> int:
    if args.san and not args.server:
        print("--san is only meaningful with --server", file=sys.stderr)
        return EXIT_USAGE
    if args.days < 1:
        print("--days must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    ca_dir = args.ca or args.out
    try:
        files = issue_cert(
            ca_dir,
            args.cn,
            out_dir=args.out,
            server=args.server,
            sans=args.san or None,
            days=args.days,
        )
    except PkiError as exc:
        print(f"pki issue: {exc}", file=sys.stderr)
        return EXIT_USAGE if "invalid common name" in str(exc) else EXIT_FAILURE
    except OSError as exc:
        print(f"pki issue: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    kind = "server" if args.server else "client"
    print(f"{kind} certificate {files.cert_file}\n{kind} key         {files.key_file} (mode 0600)")
    return EXIT_OK


def _revoke(args: argparse.Namespace) -> int:
    try:
        crl_file = revoke_cert(args.out, args.cn)
    except PkiError as exc:
        print(f"pki revoke: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"pki revoke: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"revoked {args.out / f'{args.cn}.crt'}\nCRL     {crl_file} (valid 30 days)")
    return EXIT_OK
