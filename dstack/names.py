"""Names: the one rule for workflow and tag names, and run names people can say out loud (`wet-mangust-1`)."""

from __future__ import annotations

import re
import secrets

NAME_RULE = "1–64 letters, digits, '.', '-' or '_', starting with a letter or digit"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

ADJECTIVES = (
    "amber brave calm dark eager fast gentle happy icy jolly keen lucky mellow noble odd proud quiet rapid "
    "shy tidy upbeat vivid warm young zesty bold crisp dry wet fuzzy grand lazy mild neat plain silly"
).split()
ANIMALS = (
    "ant bat cat dog eel fox gnu hare ibis jay koala lynx mole newt owl panda quail rat seal toad urchin "
    "vole wolf yak zebra bison crab dove emu frog goat heron lemur moose otter puma raven mangust"
).split()


def is_valid_name(name: str) -> bool:
    """Whether `name` may name a workflow or a tag: safe as a file name, a store key and a shell word."""
    return bool(_NAME.match(name))


def name_problem(name: str, what: str) -> str | None:
    """Why `name` can't name a `what` (workflow, tag), or None when it can."""
    if is_valid_name(name):
        return None
    return f"{what} name {name!r} is not allowed"


def name_hint(name: str) -> str:
    """What to write instead of an invalid name."""
    suggestion = _UNSAFE.sub("-", name).strip("-._")[:64]
    hint = f"use {NAME_RULE}"
    return f"{hint}, e.g. '{suggestion}'" if suggestion and suggestion != name else hint


def safe_id(text: str, limit: int = 60) -> str:
    """`text` as an id segment: characters outside the name rule become '-'; never '', '.' or '..'."""
    out = _UNSAFE.sub("-", text)[:limit].strip(".") or "x"
    return out


def run_name(taken: set[str] | None = None) -> str:
    """A fresh `adjective-animal-N` name not in `taken`."""
    taken = taken or set()
    while True:
        name = f"{secrets.choice(ADJECTIVES)}-{secrets.choice(ANIMALS)}-{secrets.randbelow(90) + 1}"
        if name not in taken:
            return name
