"""The ``certmq`` command: one entry point for operators, devices and the demo.

Each subcommand lives in its own module, imported only when it runs, so a device
install (no amqtt, no database drivers) can still run ``certmq device ...``.
A subcommand module exposes ``configure(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "main"]

#: name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("broker_plugin.demo", "run the demo: a broker and a simulated fleet get, renew and lose real certificates over MQTT/TLS"),
    "device": ("device_client.cli", "device keys, CSRs and certificates: keygen, csr, import, status"),
    "simulate": ("broker_plugin.simulate", "renewal load per day for a fleet, with and without staggering (PNG)"),
    "ca": ("broker_plugin.ca.cli", "operate the CA: init tenants, policies, claims, factory signing, revoke, CRLs"),
    "audit": ("broker_plugin.ca.cli", "verify or export the CA's hash-chained audit trail"),
    "broker": ("broker_plugin.server", "run the MQTT broker with the certmq CA plugin"),
    "status": ("broker_plugin.status", "fleet health: certificates by state, expiry, renewal forecast, audit findings"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``certmq`` with ``argv`` (default: the process arguments); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(
        prog="certmq",
        description="MQTT-native certificate management for IoT fleets.",
        epilog="Run 'certmq COMMAND --help' for a command's options.",
    )
    top.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND",
                     help="; ".join(f"{name}: {text}" for name, (_, text) in sorted(COMMANDS.items())))
    if not args or args[0] in ("-h", "--help"):
        top.print_help()
        return 0 if args else 2
    if args[0] not in COMMANDS:
        top.parse_args(args[:1])  # prints the usage error and exits 2
    module_name, text = COMMANDS[args[0]]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = "device" if args[0] == "device" else "broker"
        print(f"certmq {args[0]}: missing dependency {exc.name!r}; install it with "
              f"pip install 'certmq[{extra}]'", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"certmq {args[0]}", description=text)
    module.configure(parser)
    parsed = parser.parse_args(args[1:])
    try:
        return int(module.run(parsed))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
