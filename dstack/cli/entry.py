"""The `dstack` entry point: `dstack runs` (and `ps`) and `dstack run WORKFLOW` with plain options run
without importing typer (~15 ms of start); anything else (help, subcommands, variables, odd or bad
arguments) goes to the typer app, which does the same through the same functions."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

DEBUG = {"on": bool(os.environ.get("DSTACK_DEBUG"))}
_LISTINGS = ("runs", "ps")


def main() -> None:
    """Run `dstack ARGV`: the fast listing when the arguments are plain, else the typer app."""
    argv = sys.argv[1:]
    listing = parse_listing(argv)
    if listing is not None:
        from dstack.cli.listing import list_runs

        guarded(lambda: list_runs(**listing), logging_=False)  # `repair_runs` configures it if it repairs
        return
    run = parse_run(argv)
    if run is not None:
        from dstack.cli.launch import launch

        guarded(lambda: launch(overrides={}, args=[], **run))
        return
    from dstack.cli.main import main as typer_main

    typer_main(logging_=argv not in ([], ["--help"], ["-h"], ["--version"]))  # help logs nothing


def parse_listing(argv: list[str]) -> dict[str, Any] | None:
    """`list_runs` arguments for `[--debug] runs|ps [--json] [-a|--all] [-n|--limit N] [--sweep RUN]`, or
    None for anything else (typer parses it: help, subcommands, errors)."""
    args = list(argv)
    while args and args[0] == "--debug":
        DEBUG["on"] = True
        args.pop(0)
    if not args or args.pop(0) not in _LISTINGS:
        return None
    options: dict[str, Any] = {"limit": 20, "all_": False, "sweep": None, "as_json": False}
    while args:
        arg = args.pop(0)
        name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if not eq and arg in ("--json", "-a", "--all"):
            options["as_json" if arg == "--json" else "all_"] = True
        elif name in ("-n", "--limit", "--sweep"):
            value = inline if eq else (args.pop(0) if args else None)
            if value is None or value.startswith("-"):
                return None
            if name == "--sweep":
                options["sweep"] = value
            elif value.isascii() and value.isdigit():
                options["limit"] = int(value)
            else:
                return None
        else:
            return None  # a subcommand (`runs delete`), help, or an option typer must judge
    return options


_RUN_FLAGS = {"-d": "detach", "--detach": "detach", "--force": "force", "--keep": "keep"}
_RUN_FLAGS["--real-time-artifacts"] = "real_time"


def parse_run(argv: list[str]) -> dict[str, Any] | None:
    """`launch` arguments for `[--debug] run WORKFLOW [-d] [--force] [--keep] [--real-time-artifacts]
    [--host NAME]`, or None for anything else (variables, run arguments, help: typer parses those)."""
    args = list(argv)
    while args and args[0] == "--debug":
        DEBUG["on"] = True
        args.pop(0)
    if len(args) < 2 or args[0] != "run" or not _plain(args[1]):
        return None
    options: dict[str, Any] = {"workflow": args[1], "host": None}
    rest = args[2:]
    while rest:
        arg = rest.pop(0)
        if arg in _RUN_FLAGS:
            options[_RUN_FLAGS[arg]] = True
        elif arg == "--host" and rest and _plain(rest[0]):
            options["host"] = rest.pop(0)
        elif arg.startswith("--host=") and _plain(arg[7:]):
            options["host"] = arg[7:]
        else:
            return None
    return options


def _plain(word: str) -> bool:
    """A name typer would take as it is: not an option, not empty."""
    return bool(word) and not word.startswith("-")


def guarded(call: Callable[[], Any], logging_: bool = True) -> None:
    """Run `call`; a DstackError is one red line and its exit code (a traceback with --debug)."""
    from dstack.errors import DstackError

    if "--debug" in sys.argv[1:]:
        DEBUG["on"] = True
    if logging_:
        configure_logging()
    try:
        call()
    except DstackError as e:
        from dstack.cli import ui

        if DEBUG["on"]:
            import traceback

            traceback.print_exc()
        ui.error(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("\nInterrupted\n")
        sys.exit(130)
    except OSError as e:  # a full disk under DSTACK_HOME is one line, like any DstackError
        if e.errno != 28:  # ENOSPC
            raise
        from dstack.cli import ui
        from dstack.store.disk import disk_error

        ui.error(str(disk_error(e)))
        sys.exit(7)


def configure_logging() -> None:
    """Library loggers (paramiko, urllib3, botocore, docker) stay off the terminal, unless --debug."""
    if DEBUG["on"]:
        return
    import logging

    # Records no handler takes fall to `lastResort`, which prints them: make it drop them instead.
    # Root gets no handler, so a process that configures logging later (the orchestrator) still logs.
    logging.lastResort = logging.NullHandler()
