"""Who was champion when, and why; and the way back. MLflow aliases keep no history, so the history is rebuilt from
what the registry itself holds: every version's registration (its time, run, score, the champion's score it was
compared with and the decision: tasks/registration.py tags them) and every rollback, which `rollback` records as a
tag of the registered model (`nnlab.rollback.<ms>`: time, from, to, who, why). Nothing lives outside the store."""
from __future__ import annotations

import getpass
import json
import time
from dataclasses import asdict, dataclass

from tasks.tracking import client

ROLLBACK = "nnlab.rollback."


class RegistryError(ValueError):
    """A registered model or version that is not there (the CLI's exit 2)."""


@dataclass
class Move:
    time_ms: int
    version: int
    alias: str  # champion | challenger | (none: refused)
    event: str  # registered | rollback
    run_id: str | None
    score: float | None
    previous_champion_score: float | None
    reason: str
    previous_champion: int | None = None  # rollbacks: the version that was champion


def _float(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x else None


def _versions(name: str) -> list:
    c = client()
    try:
        c.get_registered_model(name)
    except Exception:
        raise RegistryError(f"{name}: no such registered model in {c.tracking_uri}") from None
    return sorted(c.search_model_versions(f"name = '{name}'", max_results=10000), key=lambda v: int(v.version))


def _alias_at_registration(tags: dict) -> str:
    if "nnlab.alias" in tags:
        return tags["nnlab.alias"]
    decision = tags.get("nnlab.decision", "")  # versions registered before the alias was tagged
    return "champion" if decision.endswith(": champion") else "challenger"


def history(name: str) -> list[Move]:
    """Every alias move of `name`, oldest first: each registration (champion or challenger) and each rollback."""
    moves = []
    for v in _versions(name):
        t = v.tags
        moves.append(Move(int(v.creation_timestamp), int(v.version), _alias_at_registration(t), "registered",
                          v.run_id, _float(t.get("nnlab.score")), _float(t.get("nnlab.previous_champion_score")),
                          t.get("nnlab.decision", "registered before decisions were recorded")))
    for key, value in client().get_registered_model(name).tags.items():
        if key.startswith(ROLLBACK):
            moves.append(Move(**json.loads(value)))
    return sorted(moves, key=lambda m: (m.time_ms, m.event != "registered"))


def champion_now(name: str) -> int | None:
    try:
        return int(client().get_model_version_by_alias(name, "champion").version)
    except Exception:
        return None


def rollback(name: str, version: int, reason: str) -> Move:
    """`champion` moved back to `version` (an existing version of `name`), the move recorded in the registry with
    who asked and why; the commands that read `models:/<name>@champion` then load that version."""
    versions = {int(v.version): v for v in _versions(name)}
    if version not in versions:
        raise RegistryError(f"{name}: no version {version}; versions: {', '.join(map(str, versions)) or 'none'}")
    now, was = champion_now(name), versions[version]
    if now == version:
        raise RegistryError(f"{name}: version {version} is already champion")
    c = client()
    prev_score = _float(versions[now].tags.get("nnlab.score")) if now in versions else None
    move = Move(int(time.time() * 1000), version, "champion", "rollback", was.run_id,
                _float(was.tags.get("nnlab.score")), prev_score,
                f"rollback by {getpass.getuser()}: {reason}", previous_champion=now)
    c.set_registered_model_alias(name, "champion", str(version))
    c.set_registered_model_tag(name, f"{ROLLBACK}{move.time_ms}", json.dumps(asdict(move)))
    c.set_model_version_tag(name, str(version), "nnlab.rolled_back_to", reason[:500])
    return move
