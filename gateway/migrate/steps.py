"""The upgrades from one stored layout to the next, in order. Pure: names and arguments only.

Each step converts one kind of per-device key, one key per atomic script call, and is
idempotent: a key already converted is left alone, so a step interrupted anywhere and run
again ends as one clean run does. `rolling` says whether processes of the release before the
step may keep serving while it is applied: a step that renames what they read and write is
not, and `gateway migrate --apply` refuses to run it while any gateway process listens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from gateway.keys import LAYOUT1_OWN_FIELDS, OWN_FIELDS


@dataclass(frozen=True)
class Step:
    version: int  # the layout this step leaves
    title: str
    kind: str  # the per-device key it converts: `state` (hash) or `history` (list)
    redis_type: str  # what SCAN's TYPE filter asks for
    script: str  # the name of its script in `Scripts`
    args: tuple[str, ...]  # the script's arguments after the apply flag
    rolling: bool


def _renames() -> tuple[str, ...]:
    pairs: list[str] = []
    for field in fields(OWN_FIELDS):
        old, new = getattr(LAYOUT1_OWN_FIELDS, field.name), getattr(OWN_FIELDS, field.name)
        if old != new:
            pairs += [old, new]
    return tuple(pairs)


STEPS: tuple[Step, ...] = (
    Step(
        version=2,
        title="the gateway's own device-hash fields get short names (version → v, "
        "session → sn, …): 80 bytes less per device",
        kind="state",
        redis_type="hash",
        script="migrate_fields",
        args=_renames(),
        rolling=False,
    ),
)


def after(version: int) -> list[Step]:
    """The steps that take layout *version* to this release's, in order."""
    return [step for step in STEPS if step.version > version]
