"""The `sluice` command line: serve, sim, demo, status."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    import proxy.sim
    import proxy.status

    parser = argparse.ArgumentParser(prog="sluice", description=__doc__)
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

    proxy.sim.add_arguments(commands.add_parser("sim", help="run the simulated upstream"))
    commands.add_parser("demo", help="sim + proxy + a burst of agents; prints what happens")
    proxy.status.add_arguments(commands.add_parser("status", help="show a running proxy's state"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "sim":
        import proxy.sim

        return proxy.sim.run(args)
    if args.command == "serve":
        import proxy.server

        return proxy.server.run(
            config=args.config, host=args.host, port=args.port, workers=args.workers
        )
    if args.command == "status":
        import proxy.status

        return proxy.status.run(args)
    if args.command == "demo":
        import proxy.demo

        return proxy.demo.main()
    raise AssertionError(args.command)  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
