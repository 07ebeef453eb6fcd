"""``esans serve``: run the gRPC and HTTP servers (optionally on a demo codebook)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from esans_cli import demo


def _settings_epilog() -> str:
    """Every ESANS_ setting with its default and description, for `serve --help`."""
    try:
        from esans_service.settings import ENV_PREFIX, Settings
    except ImportError:  # a client-only install has no server
        return "settings: the server is not installed here"
    lines = ["settings (environment variables; the flags above win):"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        text = f"  {ENV_PREFIX}{name.upper()} (default {default!s})"
        lines.append(text + (f": {field.description}" if field.description else ""))
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="serve SampleNegatives over gRPC and HTTP",
        description="Serve SampleNegatives over gRPC and HTTP. Every setting can also be given "
        "as an ESANS_ environment variable (listed below); flags win.",
        epilog=_settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--redis-url", help="codebook store (ESANS_REDIS_URL); default: an embedded redis-server"
    )
    p.add_argument(
        "--data-dir", help="embedded Redis data directory (ESANS_DATA_DIR; default var/redis)"
    )
    p.add_argument("--grpc-port", type=int, help="gRPC port (ESANS_GRPC_PORT; default 50051)")
    p.add_argument("--http-port", type=int, help="HTTP port (ESANS_HTTP_PORT; default 8000)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ... (ESANS_LOG_LEVEL; default INFO)")
    p.add_argument(
        "--workers",
        type=int,
        help="worker processes sharing the ports (ESANS_WORKERS; default: the CPU limit)",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="if no codebook is active, build a demo codebook (esans demo) and publish it first",
    )
    p.add_argument(
        "--demo-dir", default="var/demo", help="where --demo keeps its catalogue (default var/demo)"
    )


def serve_settings(args: argparse.Namespace) -> Any:
    from esans_service.settings import load_settings

    flags = {
        "redis_url": getattr(args, "redis_url", None),
        "data_dir": getattr(args, "data_dir", None),
        "grpc_port": getattr(args, "grpc_port", None),
        "http_port": getattr(args, "http_port", None),
        "log_level": getattr(args, "log_level", None),
        "workers": getattr(args, "workers", None),
        "redis_namespace": getattr(args, "namespace", None),
        "keep_versions": getattr(args, "keep_versions", None),
    }
    return load_settings(flags)


def run(args: argparse.Namespace) -> int:
    from esans_service.app import run_server

    settings = serve_settings(args)
    if args.demo:
        _publish_demo_if_empty(settings, Path(args.demo_dir))
    run_server(settings)
    return 0


def _publish_demo_if_empty(settings: Any, demo_dir: Path) -> None:
    from esans_sampler.artifact import read_artifact_files
    from esans_service.app import connect_redis
    from esans_service.store import CodebookStore

    client, embedded = connect_redis(settings)
    try:
        store = CodebookStore(client, settings.redis_namespace, settings.keep_versions)
        active = store.active_version()
        if active is not None:
            print(f"codebook {active[:16]} is active; not publishing the demo")
            return
        demo.run(argparse.Namespace(out=str(demo_dir), items=20_000, seed=0, quiet=False))
        version = store.publish(read_artifact_files(demo_dir / "artifact"), activate=True)
        print(f"published and activated demo codebook {version[:16]}")
    finally:
        client.close()
        if embedded is not None:
            embedded.stop()
