"""The ``token-broker`` command line: serve, check-config, once, token, dev-issuer."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import structlog

from broker import __version__, logs
from broker.errors import BrokerError, ConfigError
from broker.loader import Loaded, load

# Exit codes, documented in the README.
OK, FAILED, USAGE, UNREACHABLE = 0, 1, 2, 3
DEFAULT_SOCKET = "/tmp/token-broker.sock"  # noqa: S108 - matches the config default

log = structlog.get_logger("broker.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.run

    try:
        return command(args)
    except BrokenPipeError:
        # The reader went away (``check-config | head``): not an error of
        # ours, and no traceback. Point stdout at /dev/null so the final
        # flush at exit cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="token-broker",
        description="Fetch, refresh and serve OAuth 2.0 client-credentials tokens.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int], text: str) -> Any:
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument(
            "--log-level",
            choices=["debug", "info", "warning", "error"],
            help="override log.level from the config",
        )
        sub.set_defaults(run=run)
        return sub

    serve = command("serve", _serve, "run the broker in the foreground")
    serve.add_argument("-c", "--config", required=True, help="config file (YAML)")

    check = command("check-config", _check, "validate a config file and describe it")
    check.add_argument("-c", "--config", required=True, help="config file (YAML)")

    token = command("token", _token, "print a token from a running broker")
    token.add_argument("client", help="the client's name in the config")
    _broker_address(token)
    token.add_argument("--format", choices=["raw", "json", "header"], default="raw")
    token.add_argument("--min-ttl", type=float, help="seconds the token must live")
    token.add_argument(
        "--key-file",
        default=os.environ.get("TOKEN_BROKER_KEY_FILE"),
        help="send the caller key in this file (a client with callers: keys); "
        "default $TOKEN_BROKER_KEY_FILE",
    )

    status = command("status", _status, "show each client's state in a running broker")
    _broker_address(status)
    status.add_argument("--json", action="store_true", help="print the JSON answer")

    once = command("once", _once, "fetch tokens once, write their files, and exit")
    once.add_argument("-c", "--config", required=True, help="config file (YAML)")
    once.add_argument("clients", nargs="*", metavar="CLIENT", help="default: all")
    once.add_argument(
        "--attempts",
        type=_attempts,
        default=3,
        help="tries per client for transient failures (default 3)",
    )

    dev = command("dev-issuer", _dev_issuer, "run only the config's dev_issuer")
    dev.add_argument("-c", "--config", required=True, help="config file (YAML)")

    return parser


def _broker_address(sub: argparse.ArgumentParser) -> None:
    where = sub.add_mutually_exclusive_group()
    where.add_argument("--socket", help=f"broker socket (default {DEFAULT_SOCKET})")
    where.add_argument("--url", help="broker TCP URL, e.g. http://127.0.0.1:8181")
    where.add_argument("-c", "--config", help="take the socket path from this config")


def _socket_of(args: argparse.Namespace) -> str | int | None:
    """The socket to ask (``None`` with --url), or an exit code on error."""
    if args.url is not None:
        return None
    if args.config:
        loaded = _load(args)
        if loaded is None:
            return USAGE
        if loaded.config.listen.unix is None:
            print("token-broker: that config has no unix socket", file=sys.stderr)
            return USAGE
        return loaded.config.listen.unix
    return args.socket or os.environ.get("TOKEN_BROKER_SOCKET", DEFAULT_SOCKET)


def _load(args: argparse.Namespace) -> Loaded | None:
    try:
        return load(args.config, os.environ)
    except ConfigError as exc:
        print(f"token-broker: config error: {exc}", file=sys.stderr)
        return None


def _configure_logs(args: argparse.Namespace, loaded: Loaded | None) -> None:
    level = args.log_level or (loaded.config.log.level if loaded else "info")
    fmt = loaded.config.log.format if loaded else "auto"
    # Daemons log to stdout (container log collectors read it); one-shot
    # commands keep stdout for their answer and log to stderr.
    daemon = args.run in (_serve, _dev_issuer)
    logs.configure(level, fmt, sys.stdout if daemon else sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    # SIGHUP's default action ends the process. Until the reload handler is
    # installed, a reload request has nothing to do: the file is read now.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    loaded = _load(args)
    if loaded is None:
        return USAGE
    _configure_logs(args, loaded)
    for kind, client in loaded.warnings:
        log.warning(f"config.{kind}", client=client, file=loaded.path)

    from broker.reload import Source
    from broker.server import install_signals, serve

    source = Source(loaded.path, os.environ, args.log_level, sys.stdout)

    async def run() -> None:
        stop = asyncio.Event()
        install_signals(asyncio.get_running_loop(), stop)
        await serve(loaded.config, stop, source)

    return _run_daemon(run)


def _dev_issuer(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return USAGE
    settings = loaded.config.dev_issuer
    if settings is None:
        print(f"token-broker: {args.config} has no dev_issuer block", file=sys.stderr)
        return USAGE
    _configure_logs(args, loaded)

    from broker import devissuer
    from broker.server import install_signals

    async def run() -> None:
        stop = asyncio.Event()
        install_signals(asyncio.get_running_loop(), stop)
        server = await devissuer.start(settings)
        try:
            await stop.wait()
        finally:
            await server.close()

    return _run_daemon(run)


def _run_daemon(run: Callable[[], Coroutine[Any, Any, None]]) -> int:
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(run())
    except (BrokerError, OSError) as exc:
        log.error("broker.start_failed", error=str(exc))
        return FAILED

    return OK


def _keep_inherited_descriptors() -> None:
    """Mark descriptors the broker inherited close-on-exec.

    uvloop's subprocesses ignore ``close_fds``, so an ``on_refresh`` command
    would otherwise get every descriptor the broker was started with (a
    shell's, a supervisor's). The broker's own descriptors are already
    close-on-exec; stdin, stdout and stderr stay as they are.
    """
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2:
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    _keep_inherited_descriptors()
    with contextlib.suppress(ImportError):
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return None


def _check(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return USAGE

    from broker.describe import describe
    from broker.sinks import check_sinks

    problems = check_sinks(loaded.config)
    for problem in problems:
        print(f"token-broker: config error: {loaded.path}: {problem}", file=sys.stderr)
    if problems:
        return USAGE

    print(describe(loaded))
    return OK


def _attempts(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 10:
        raise argparse.ArgumentTypeError("expected a whole number from 1 to 10")
    return int(text)


def _once(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return USAGE
    unknown = [name for name in args.clients if name not in loaded.config.clients]
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        print(f"token-broker: {args.config} has no client {names}", file=sys.stderr)
        return USAGE
    _configure_logs(args, loaded)
    for kind, client in loaded.warnings:
        log.warning(f"config.{kind}", client=client, file=loaded.path)

    from broker import oneshot

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            outcomes = runner.run(
                oneshot.run_once(loaded.config, args.clients, attempts=args.attempts)
            )
    except (BrokerError, OSError) as exc:
        print(f"token-broker: {exc}", file=sys.stderr)
        return FAILED

    print(oneshot.summary(outcomes), end="")
    return oneshot.exit_code(outcomes)


def _token(args: argparse.Namespace) -> int:
    from broker.client import BrokerUnreachable, ask_token

    socket_path = _socket_of(args)
    if isinstance(socket_path, int):
        return socket_path
    key = None
    if args.key_file:
        from broker.callers import read_keys

        try:
            key = read_keys(args.key_file)[0]
        except ValueError as exc:
            print(f"token-broker: {exc}", file=sys.stderr)
            return USAGE

    try:
        answer = asyncio.run(
            ask_token(
                args.client,
                socket_path=socket_path,
                url=args.url,
                min_ttl=args.min_ttl,
                key=key,
            )
        )
    except BrokerUnreachable as exc:
        print(f"token-broker: {exc}", file=sys.stderr)
        return UNREACHABLE

    if answer.status != 200:
        message = answer.body.get("message") or f"status {answer.status}"
        print(f"token-broker: {args.client}: {message}", file=sys.stderr)
        return FAILED

    token = answer.body.get("access_token")
    if not isinstance(token, str) or not token:
        print(
            f"token-broker: {args.client}: the answer holds no token", file=sys.stderr
        )
        return FAILED
    if args.format == "json":
        print(answer.raw)
    elif args.format == "header":
        print(f"Authorization: Bearer {token}")
    else:
        print(token)

    return OK


def _status(args: argparse.Namespace) -> int:
    from broker.client import BrokerUnreachable, ask
    from broker.status import table

    socket_path = _socket_of(args)
    if isinstance(socket_path, int):
        return socket_path
    try:
        answer = asyncio.run(ask("/v1/clients", socket_path=socket_path, url=args.url))
    except BrokerUnreachable as exc:
        print(f"token-broker: {exc}", file=sys.stderr)
        return UNREACHABLE
    if answer.status != 200:
        print(f"token-broker: status {answer.status}: {answer.raw}", file=sys.stderr)
        return FAILED

    print(answer.raw if args.json else table(answer.body))
    return OK
