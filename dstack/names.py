"""Run names people can say out loud: `wet-mangust-1`."""

from __future__ import annotations

import secrets

ADJECTIVES = (
    "amber brave calm dark eager fast gentle happy icy jolly keen lucky mellow noble odd proud quiet rapid "
    "shy tidy upbeat vivid warm young zesty bold crisp dry wet fuzzy grand lazy mild neat plain silly"
).split()
ANIMALS = (
    "ant bat cat dog eel fox gnu hare ibis jay koala lynx mole newt owl panda quail rat seal toad urchin "
    "vole wolf yak zebra bison crab dove emu frog goat heron lemur moose otter puma raven mangust"
).split()


def run_name(taken: set[str] | None = None) -> str:
    """A fresh `adjective-animal-N` name not in `taken`."""
    taken = taken or set()
    while True:
        name = f"{secrets.choice(ADJECTIVES)}-{secrets.choice(ANIMALS)}-{secrets.randbelow(90) + 1}"
        if name not in taken:
            return name
