"""Registry of paper reproductions, run by ``fastmodels reproduce <name> [--quick]``.

A reproduction module registers a function ``run(quick: bool, out_dir: Path) -> dict`` that writes
its results (JSON, plots) under ``out_dir`` and returns a summary. ``--quick`` must finish in
about a minute on a 2-core CPU; ``fastmodels demo`` runs every quick reproduction.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Reproduction:
    name: str
    paper: str
    description: str
    run: Callable[[bool, Path], dict]


_REPRODUCTIONS: dict[str, Reproduction] = {}


def register(name: str, paper: str, description: str):
    def deco(fn: Callable[[bool, Path], dict]):
        _REPRODUCTIONS[name] = Reproduction(name, paper, description, fn)
        return fn

    return deco


def reproductions() -> dict[str, Reproduction]:
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    return dict(sorted(_REPRODUCTIONS.items()))
