"""The teacher families this project knows. Adding a family: a sub-package of ``dd.families`` with a ``Family``
adapter (``dd.families.base``), and one line here."""
from __future__ import annotations

from dd.families.base import Family
from dd.families.llamagen.family import FAMILY as LLAMAGEN
from dd.families.var.family import FAMILY as VAR
from dd.io import ArtefactError

FAMILIES: dict[str, Family] = {f.name: f for f in (
    LLAMAGEN,
    VAR,
)}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ArtefactError(f"unknown teacher family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]
