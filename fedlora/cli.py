"""The ``fedlora`` command: deployment tooling (keys and certificates).

fedlora pki ca --dir certs
fedlora pki server --dir certs --host superlink.example.org --ip 10.0.0.5
fedlora pki node --dir keys hospital-a
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedlora import pki


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the sub-command; errors print one line and exit 2."""
    parser = argparse.ArgumentParser(prog="fedlora", description="fedlora deployment tooling")
    commands = parser.add_subparsers(dest="group", required=True)
    pki_parser = commands.add_parser("pki", help="keys and certificates for TLS and SuperNode authentication")
    kinds = pki_parser.add_subparsers(dest="kind", required=True)

    ca = kinds.add_parser("ca", help="create a certificate authority (ca.crt, ca.key)")
    server = kinds.add_parser("server", help="create the SuperLink's TLS certificate (server.pem, server.key)")
    server.add_argument("--host", action="append", default=[], help="DNS name the SuperLink is reached by (repeat)")
    server.add_argument("--ip", action="append", default=[], help="IP address the SuperLink is reached by (repeat)")
    node = kinds.add_parser("node", help="create a SuperNode's authentication key pair (NAME, NAME.pub)")
    node.add_argument("name", help="file name of the key pair, e.g. the organisation's name")
    for sub in (ca, server, node):
        sub.add_argument("--dir", type=Path, default=Path("certs"), help="output folder (default: certs)")
        sub.add_argument("--force", action="store_true", help="replace existing files")

    args = parser.parse_args(argv)
    try:
        if args.kind == "ca":
            path = pki.create_ca(args.dir, force=args.force)
        elif args.kind == "server":
            path = pki.create_server_certificate(args.dir, args.host, args.ip, force=args.force)
        else:
            path = pki.create_node_key(args.dir, args.name, force=args.force)
    except (OSError, ValueError) as err:
        print(f"fedlora: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
