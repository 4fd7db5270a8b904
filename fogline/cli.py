"""The `fogline` command. Subcommands import their heavy dependencies lazily:
`fogline --help` and every edge path stay free of torch and transformers.

Every FoglineError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fogline import __version__
from fogline.errors import FoglineError

Handler = Callable[[argparse.Namespace], int]


def _export(args: argparse.Namespace) -> int:
    from quantize.export import main

    return main(args)


def _inspect(args: argparse.Namespace) -> int:
    from fogline.inspect import main

    return main(args)


def _install_service(args: argparse.Namespace) -> int:
    from fogline.service_install import main

    return main(args)


def _doctor(args: argparse.Namespace) -> int:
    from fogline.doctor import main

    return main(args)


def _edge_serve(args: argparse.Namespace) -> int:
    from edge_runtime.serve import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    from fogline.service_install import add_arguments as add_install_arguments  # light: argparse only

    parser = argparse.ArgumentParser(prog="fogline", description="Split LLM runtime: edge (llama.cpp) + cloud (PyTorch).")
    parser.add_argument("--version", action="version", version=f"fogline {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("export", help="turn a model into a matched edge GGUF + cloud shard")
    _add_export_arguments(p)
    p.set_defaults(handler=_export)

    p = sub.add_parser("inspect", help="print a bundle's manifest and re-verify its file hashes")
    p.add_argument("bundle", help="an export directory (with edge/ and cloud/) or one half of it")
    p.add_argument("--plot", metavar="PNG", help="also draw the edge half's exit calibration curve to this file")
    p.set_defaults(handler=_inspect)

    p = sub.add_parser("doctor", help="check this host: llama.cpp build and decode, torch, memory, cloud, port")
    from fogline.doctor import add_arguments as add_doctor_arguments  # light: argparse only

    add_doctor_arguments(p)
    p.set_defaults(handler=_doctor)

    p = sub.add_parser("cloud", help="the cloud half: serve the deep layers to edges")
    cloud_sub = p.add_subparsers(dest="cloud_command", metavar="COMMAND")
    cloud_sub.required = True
    p = cloud_sub.add_parser("serve", help="serve a cloud bundle to edges over websockets")
    _add_cloud_serve_arguments(p)
    p.set_defaults(handler=_cloud_serve)
    p = cloud_sub.add_parser("install-service", help="write the cloud's systemd unit and a commented default config")
    add_install_arguments(p, role="cloud")
    p.set_defaults(handler=_install_service)

    p = sub.add_parser("install-service", help="write a systemd unit and a commented default config (kept if present)")
    add_install_arguments(p)
    p.set_defaults(handler=_install_service)

    p = sub.add_parser("edge", help="the edge runtime (llama.cpp + OpenAI-compatible API)")
    edge = p.add_subparsers(dest="edge_command", metavar="EDGE_COMMAND")
    edge.required = True
    p = edge.add_parser("serve", help="serve an edge bundle over an OpenAI-compatible HTTP API")
    from edge_runtime.serve import add_arguments as add_edge_serve_arguments  # light: argparse only

    add_edge_serve_arguments(p)
    p.set_defaults(handler=_edge_serve)
    p = edge.add_parser("install-service", help="write the edge's systemd unit and a commented default config")
    add_install_arguments(p, role="edge")
    p.set_defaults(handler=_install_service)
    return parser


def _cloud_serve(args: argparse.Namespace) -> int:
    from cloud_runtime.server import main

    return main(args)


def _add_cloud_serve_arguments(p: argparse.ArgumentParser) -> None:
    from cloud_runtime.config import add_arguments  # torch-free

    add_arguments(p)


def _add_export_arguments(p: argparse.ArgumentParser) -> None:
    # Declared here (not imported from quantize.export) so that `--help` costs nothing.
    from quantize.export import add_arguments

    add_arguments(p)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except FoglineError as e:
        print(f"fogline {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fogline {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
