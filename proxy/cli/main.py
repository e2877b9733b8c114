"""The `sluice` command line: serve, sim, demo, status.

Each subcommand imports its module only when chosen, so `sluice serve` never loads
the simulator or the demo (docs/design.md, "Layers").
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the `sim` subcommand's own options are added only when `command`
    is "sim" (they live in the simulator's module)."""
    from proxy.cli import status

    parser = argparse.ArgumentParser(prog="sluice", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--version", action="version", version=f"sluice {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="TOML file (default: $SLUICE_CONFIG, then ./sluice.toml)")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (default 1; more than 1 needs cluster.redis_url)",
    )

    sim = commands.add_parser("sim", help="run the simulated upstream")
    if command == "sim":
        from proxy.tools import sim as sim_module

        sim_module.add_arguments(sim)
    commands.add_parser("demo", help="sim + proxy + a burst of agents; prints what happens")
    status.add_arguments(commands.add_parser("status", help="show a running proxy's state"))
    return parser


def package_version() -> str:
    try:
        return version("llm-sluice")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    if args.command == "sim":
        from proxy.tools import sim

        return sim.run(args)
    if args.command == "serve":
        from proxy.cli import serve

        return serve.run(config=args.config, host=args.host, port=args.port, workers=args.workers)
    if args.command == "status":
        from proxy.cli import status

        return status.run(args)
    if args.command == "demo":
        from proxy.tools import demo

        return demo.main()
    raise AssertionError(args.command)  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
