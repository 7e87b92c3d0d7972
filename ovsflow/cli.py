"""The `ovsflow` command: argument parsing, logging set-up, and one function per subcommand."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time

from . import __version__
from .config import Config, ConfigError, load_config
from .connection import labels_value
from .logs import RepeatFilter

log = logging.getLogger("ovsflow")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RepeatFilter())  # a line that repeats: once a minute (logs.py)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="least severe level logged to stderr (default: info)")
    common.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="text lines, or one JSON object per line (default: text)")

    parser = argparse.ArgumentParser(
        prog="ovsflow",
        description="IPFIX flow exporter for Open vSwitch: exports conntrack connections and "
                    "denied packets of the configured IP protocols.")
    parser.add_argument("--version", action="version", version=f"ovsflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", parents=[common], help="run the agent",
                              description="Poll conntrack and listen for denied packets, "
                              "export IPFIX records. SIGTERM/SIGINT: flush and exit 0.")
    run.add_argument("--config", required=True, metavar="FILE", help="YAML configuration")
    run.set_defaults(handler=cmd_run)

    check = commands.add_parser(
        "check-config", parents=[common], help="validate a configuration file",
        description="Validate FILE and print the effective configuration. Warnings go to "
        "stderr. Exit status 0 when the agent would start, 2 when it would refuse.")
    check.add_argument("file", metavar="FILE")
    check.add_argument("--json", action="store_true",
                       help="print one JSON object; flowExporter.protocols is the sorted list "
                       "of protocol numbers or \"all\"")
    check.set_defaults(handler=cmd_check_config)

    collect = commands.add_parser(
        "collect", parents=[common], help="a built-in IPFIX collector printing JSON lines",
        description="Receive IPFIX and print one JSON object per data record.")
    collect.add_argument("--listen", required=True, metavar="URL",
                         help="udp://HOST:PORT, tcp://HOST:PORT or tls://HOST:PORT")
    collect.add_argument("--count", type=int, metavar="N", help="exit after N data records")
    collect.add_argument("--timeout", type=float, metavar="SECONDS",
                         help="exit after this many seconds")
    collect.add_argument("--cert", metavar="FILE", help="TLS server certificate (PEM)")
    collect.add_argument("--key", metavar="FILE", help="TLS server private key (PEM)")
    collect.add_argument("--client-ca", metavar="FILE",
                         help="require exporters' TLS client certificates from this CA (PEM)")
    collect.set_defaults(handler=cmd_collect)

    conntrack = commands.add_parser(
        "conntrack", parents=[common], help="one poll of the configured conntrack source",
        description="Dump conntrack with the configured zone and protocol filters and print "
        "one JSON object per connection.")
    conntrack.add_argument("--config", required=True, metavar="FILE", help="YAML configuration")
    conntrack.add_argument("--count", action="store_true", help="print only the number")
    conntrack.set_defaults(handler=cmd_conntrack)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:  # `ovsflow conntrack | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _load_or_report(path: str) -> Config | None:
    """Load the configuration, printing each problem and warning as one stderr line."""
    try:
        config = load_config(path)
    except ConfigError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"error: {path}: the agent would refuse to start", file=sys.stderr)
        return None
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return config


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load_or_report(args.file)
    if config is None:
        return EXIT_CONFIG
    effective = config.to_dict()
    if args.json:
        print(json.dumps(effective, sort_keys=True))
        return EXIT_OK
    effective["flowExporter"]["protocols"] = config.flow_exporter.protocols.describe()
    for section, values in effective.items():
        print(f"{section}:")
        for key, value in values.items():
            print(f"  {key}: {json.dumps(value) if not isinstance(value, str) else value}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    if not config.flow_exporter.enable:
        log.warning("flowExporter.enable is false: nothing to export; exiting")
        return EXIT_OK
    import asyncio

    from .agent import Agent

    async def run() -> None:
        await Agent(config, args.config).run()

    try:
        asyncio.run(run())
    except OSError as err:  # e.g. the metrics address is taken
        log.error("cannot run: %s", err)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_collect(args: argparse.Namespace) -> int:
    import asyncio
    import ssl

    from .collector import ListenUrlError, collect

    try:
        return asyncio.run(collect(args.listen, count=args.count, timeout=args.timeout,
                                   cert=args.cert, key=args.key,
                                   client_ca=args.client_ca))
    except (ListenUrlError, OSError, ssl.SSLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG


def cmd_conntrack(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    from .filter import ConnectionFilter
    from .source import open_source

    try:
        # a diagnostic: it switches no accounting sysctl on
        source = open_source(config, ConnectionFilter(config.conntrack.zones,
                                                      config.flow_exporter.protocols),
                             accounting=False)
        if args.count:  # counted without decoding every entry
            print(source.count())
            return EXIT_OK
        connections = source.dump_all()
    except (OSError, RuntimeError, ValueError) as err:
        print(f"error: conntrack poll failed: {err}", file=sys.stderr)
        return EXIT_FAILURE
    write = sys.stdout.write
    for connection in connections:
        write(json.dumps(connection_json(connection)) + "\n")
    return EXIT_OK


def connection_json(c) -> dict:
    return {"protocol": c.protocol, "source": _address(c.source),
            "destination": _address(c.destination), "sourcePort": c.source_port,
            "destinationPort": c.destination_port, "replySource": _address(c.reply_source),
            "replyDestination": _address(c.reply_destination),
            "replySourcePort": c.reply_source_port,
            "replyDestinationPort": c.reply_destination_port, "icmpType": c.icmp_type,
            "icmpCode": c.icmp_code, "icmpId": c.icmp_id, "zone": c.zone, "mark": c.mark,
            "labels": hex(labels_value(c.labels)), "status": c.status, "state": c.state,
            "packets": c.packets if c.counted else None,
            "octets": c.octets if c.counted else None,
            "replyPackets": c.reply_packets if c.counted else None,
            "replyOctets": c.reply_octets if c.counted else None,
            "startNs": c.start_ns or None, "id": c.id, "timeout": c.timeout}


def _address(packed: bytes) -> str:
    if not packed:
        return ""
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)
