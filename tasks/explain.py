"""Pydantic's validation errors -> the lines a user reads: the dotted key, the bad value, what is allowed there,
and a "did you mean" for a near miss (params.yaml, --set, sweep files)."""
from __future__ import annotations

import difflib
import re

from pydantic import BaseModel, ValidationError

def _fields_at(model: type[BaseModel], loc: tuple) -> list[str] | None:
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = model.model_fields[part].annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return None


def format_errors(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join([prefix] * bool(prefix) + [str(p) for p in loc])
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1]) or []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
            hint = f" did you mean {'.'.join(key.split('.')[:-1] + [close[0]])!r}?" if close else ""
            lines.append(f"unknown key {key!r}.{hint} allowed keys here: {', '.join(allowed)}")
        elif e["type"] in ("literal_error", "enum"):
            allowed = re.findall(r"'([^']*)'|(\d+)", e.get("ctx", {}).get("expected", ""))
            allowed = [a or b for a, b in allowed]
            close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.6)
            hint = f" did you mean {close[0]!r}?" if close else ""
            lines.append(f"{key} = {value!r} is not allowed.{hint} allowed: {', '.join(allowed)}")
        else:
            lines.append(f"{key} = {value!r}: {e['msg'].replace('Value error, ', '')}")
    return "invalid params:\n  " + "\n  ".join(lines) if len(lines) > 1 else f"invalid params: {lines[0]}"
