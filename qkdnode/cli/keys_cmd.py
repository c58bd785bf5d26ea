"""``qkdnode keys gen-curve`` and ``qkdnode keys public``: CURVE key pairs for the bus."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from qkdnode.bus.errors import KeyFileError
from qkdnode.bus.keys import load_keypair, write_keypair
from qkdnode.cli import EXIT_OK, EXIT_USAGE


def register(sub: Any) -> None:
    p = sub.add_parser("keys", help="CURVE key pairs for the ZeroMQ bus")
    ksub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    gen = ksub.add_parser("gen-curve", help="write NAME.key (secret, 0600) and NAME.pub (Z85)")
    gen.add_argument("--out", required=True, help="output directory (created if missing)")
    gen.add_argument("--name", default="curve", help="file base name (default: curve)")
    gen.add_argument("--force", action="store_true", help="replace existing files")
    gen.add_argument("--json", action="store_true", help="print paths and public key as JSON")
    gen.set_defaults(func=_gen)
    pub = ksub.add_parser("public", help="print the public key of a secret key file")
    pub.add_argument("secret_file", help="NAME.key")
    pub.add_argument("--json", action="store_true")
    pub.set_defaults(func=_public)


def _gen(args: argparse.Namespace) -> int:
    try:
        secret_path, public_path = write_keypair(args.out, args.name, overwrite=args.force)
    except (KeyFileError, OSError) as exc:
        print(f"keys gen-curve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    public = public_path.read_text("ascii").strip()
    if args.json:
        print(
            json.dumps(
                {
                    "secret_file": str(secret_path),
                    "public_file": str(public_path),
                    "public_key": public,
                }
            )
        )
    else:
        print(f"secret key: {secret_path} (mode 0600, keep it private)")
        print(f"public key: {public_path}")
        print(f"  {public}")
    return EXIT_OK


def _public(args: argparse.Namespace) -> int:
    try:
        public, _secret = load_keypair(args.secret_file)
    except (KeyFileError, OSError) as exc:
        print(f"keys public: {exc}", file=sys.stderr)
        return EXIT_USAGE
    text = public.decode("ascii")
    print(json.dumps({"public_key": text}) if args.json else text)
    return EXIT_OK
