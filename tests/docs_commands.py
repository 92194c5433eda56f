"""The command blocks of README.md and docs/, read as a newcomer reads them: in order, each ```bash block a list
of commands to type. A ```bash block is a promise that it runs as written on a fresh clone after `make install`;
commands that need what a fresh clone lacks (a download, a bucket, a second machine, a server left running in
another terminal) sit in ```shell blocks with a sentence saying what they need, and are only parsed.

`check(doc_commands())` follows them like a user would, without training anything: each `nnlab` command line must
parse against the real CLI, its `--set`s against the real params schema, its sweep file against the sweep schema,
each file it reads must exist in the repository or be written by an earlier documented command, and each
`models:/<name>@<alias>` must name exactly one model the documented commands before it register (the registry's
own lookup rule: tasks/store_reader.py's version_of). tests/test_docs_run.py then runs them all, in order, with
NNLAB_QUICK (tasks/quick.py).
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the reading order: the README, then the docs it links, in the order it links them
DOCS = ["README.md", "docs/models.md", "docs/pipeline.md", "docs/sweeps.md", "docs/distributed.md",
        "docs/diagnostics.md", "docs/configuration.md", "docs/development.md"]
RUNNABLE = "bash"  # ```bash: runs as written on a fresh clone; ```shell: needs something the clone lacks
PROJECT_TOOLS = {"nnlab", "dvc", "make", "prefect", "mlflow", "dask", "git", "export", "cd", "python", "ls"}


@dataclass
class Command:
    doc: str
    line: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # the block shows this command failing: the `# error: …` line right after it

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {shlex.join(self.argv)}"


def blocks(doc: str, fence: str = RUNNABLE) -> list[tuple[int, list[str]]]:
    """(line number of the block's first line, its lines) of each ```<fence> block of `doc`."""
    out, current, start = [], None, 0
    for n, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
        if current is None and line.strip() == f"```{fence}":
            current, start = [], n + 1
        elif current is not None and line.strip().startswith("```"):
            out.append((start, current))
            current = None
        elif current is not None:
            current.append(line)
    return out


def commands_of(doc: str, start: int, lines: list[str]) -> list[Command]:
    """One Command per command line: `\\` continuations joined, comments dropped, `a && b` split, `VAR=value`
    prefixes kept as the command's environment."""
    out, pending, first = [], "", start
    for n, line in enumerate(lines, start):
        if not pending:
            first = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if line.lstrip().startswith("# error:") and out:
            out[-1].error = line.split("# error:", 1)[1].strip()
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        for part in _split_and(words):
            env = {}
            while part and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", part[0]):
                k, v = part.pop(0).split("=", 1)
                env[k] = v
            if part:
                out.append(Command(doc, first, part, env))
    return out


def _split_and(words: list[str]) -> list[list[str]]:
    parts = [[]]
    for w in words:
        if w == "&&":
            parts.append([])
        else:
            parts[-1].append(w)
    return parts


def doc_commands(fence: str = RUNNABLE) -> list[Command]:
    return [c for doc in DOCS for start, lines in blocks(doc, fence) for c in commands_of(doc, start, lines)]


# ---------------------------------------------------------------- following them without training


class DocError(AssertionError):
    pass


@dataclass
class State:
    made: set[str] = field(default_factory=set)  # files the documented commands write
    registered: set[str] = field(default_factory=set)  # registered-model names they make


def check(cmds: list[Command]) -> State:
    state = State()
    for c in cmds:
        if c.error is None:
            check_one(c, state)
            continue
        try:
            check_one(c, state)
        except DocError as e:
            if c.error.split("...")[0].split("…")[0] not in str(e):
                raise DocError(f"{c}: the docs show the error {c.error!r}; it is now: {e}") from None
        else:
            raise DocError(f"{c}: the docs show it failing ({c.error}); it passes")
    return state


def check_one(c: Command, state: State) -> None:
    tool = Path(c.argv[0]).name
    if tool not in PROJECT_TOOLS:
        raise DocError(f"{c}: `{tool}` is not a command a fresh clone has (move it to a ```shell block)")
    if tool == "nnlab":
        check_nnlab(c, state)
    elif tool == "make":
        targets = re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M)
        for t in c.argv[1:]:
            if t not in targets:
                raise DocError(f"{c}: the Makefile has no target {t!r} (it has {', '.join(targets)})")
    elif tool == "dvc":
        check_dvc(c)


def _options(argv: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    opts: dict[str, list[str]] = {}
    positional, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            opts.setdefault(a, []).append(argv[i + 1])
            i += 2
        else:
            (opts.setdefault(a, []) if a.startswith("-") else positional).append(a)
            i += 1
    return opts, positional


def parse_cli(c: Command) -> None:
    """The line as the real `nnlab` parses it: an unknown command, option or a bad value is an error here."""
    import typer.main

    from flows.cli import app

    group = typer.main.get_command(app)
    try:
        with group.make_context("nnlab", list(c.argv[1:])) as ctx:
            name, sub, rest = group.resolve_command(ctx, list(c.argv[1:2]) + ctx.args)
            sub.make_context(name, rest, parent=ctx).close()
    except Exception as e:  # Click's usage errors (Typer carries its own Click: caught by what they offer)
        if not hasattr(e, "format_message"):
            raise
        raise DocError(f"{c}: {e.format_message()}") from None


def check_nnlab(c: Command, state: State) -> None:
    parse_cli(c)
    verb, argv = c.argv[1], c.argv[2:]
    opts, positional = _options(argv)
    sets = [s for flag in ("--set", "-s") for s in opts.get(flag, [])]
    if verb == "run":
        _check_run(c, sets, opts, state)
    elif verb == "sweep":
        _check_sweep(c, positional, sets)
    elif verb in ("predict", "translate", "transcribe", "sample"):
        default = "models:/nnlab-translator@champion" if verb == "translate" else None
        ref = (opts.get("--model") or opts.get("-m") or positional[:1] or [default])[0]
        if ref:
            resolve(c, ref, state)
        inputs = opts.get("--input", []) + opts.get("-i", []) + (positional[1:] if verb == "transcribe" else [])
        inputs += opts.get("--file", []) + opts.get("-f", [])
        for f in inputs:
            _needs_file(c, f, state)
    for flag in ("-o", "--out", "--output"):
        state.made.update(opts.get(flag, []))
    if verb.startswith("example-"):
        state.made.update(positional[:1])


def _check_run(c: Command, sets: list[str], opts: dict, state: State) -> None:
    from tasks.config import ConfigError, load_config
    from tasks.kinds import register_name

    models = [m for v in opts.get("--models", []) for m in v.split(",")] or None
    params = (opts.get("--params") or ["params.yaml"])[0]
    try:
        cfg = load_config(ROOT / params, sets, models)
    except ConfigError as e:
        raise DocError(f"{c}: {e}") from None
    path = cfg.data.path
    if path:
        _needs_file(c, path, state)
    if cfg.register.enabled:
        state.registered.add(register_name(cfg))


def _check_sweep(c: Command, positional: list[str], sets: list[str]) -> None:
    from tasks.config import ConfigError, read_yaml
    from tasks.search import expand  # a grid's cells, or a search's
    from tasks.sweep import load_spec

    params = read_yaml(ROOT / "params.yaml")
    try:
        spec = load_spec(ROOT / positional[0] if positional else None, params)
        expand(spec, params, sets)
    except ConfigError as e:
        raise DocError(f"{c}: {e}") from None


def _needs_file(c: Command, path: str, state: State) -> None:
    if path not in state.made and not (ROOT / path).exists():
        raise DocError(f"{c}: reads {path!r}, which no earlier documented command writes and a fresh clone lacks "
                       "(make it with an `nnlab example-*` command first)")


def resolve(c: Command, ref: str, state: State) -> str:
    """The registered model `ref` names after the commands so far, by the registry's own rule: the name itself,
    else the one `<name>-<dataset>`; none or several is the error a user would meet."""
    m = re.fullmatch(r"models:/([^/@]+)(?:@\w+|/\d+)", ref)
    if not m:
        return ref  # a run id or runs:/ URI: nothing the docs can know in advance
    name = m.group(1)
    if name in state.registered:
        return name
    found = sorted(r for r in state.registered if r.startswith(name + "-"))
    if len(found) != 1:
        why = f"ambiguous: {', '.join(found)}" if found else "registered by no earlier documented command"
        raise DocError(f"{c}: {ref} is {why} (registered so far: {sorted(state.registered)})")
    return found[0]


def check_dvc(c: Command) -> None:
    import yaml

    verb = c.argv[1] if len(c.argv) > 1 else ""
    if verb == "repro":
        stages = (yaml.safe_load((ROOT / "dvc.yaml").read_text()) or {})["stages"]
        for t in (a for a in c.argv[2:] if not a.startswith("-")):
            if t.split("@")[0] not in stages:
                raise DocError(f"{c}: dvc.yaml has no stage {t!r} (it has {', '.join(stages)})")
