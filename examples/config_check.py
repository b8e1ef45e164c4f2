"""Check the command line's overrides against conf/ before Hydra composes and before torch loads.

A typo in a suite option (``+gradstab.guard.max_rng=skip``), a value outside a model option's choices
(``model.init=hee``), an unknown group option (``task=mnsit``) or an unknown suite entry is answered in well
under two seconds with one line naming the key or group, the accepted values and the closest one, instead of
a traceback after torch and Lightning have loaded. The suite callbacks' options are read from their
constructors' signatures in the source (``ast``, nothing imported), so they never go out of date; the options
of a nested config object (``+gradstab.guard.config.growth_factor=3``) are read from its dataclass's fields.

Example::

    problem = check_overrides(["+gradstab.guard.max_rng=skip"], Path("conf"))
    # "+gradstab.guard.max_rng=skip: gradstab.guard (ExplosionGuard) has no option 'max_rng'; did you mean
    #  'max_rung'? (options: max_rung, max_norm, config, ...)"
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from examples.schema import MODEL_CHOICES

INTERNAL_GROUPS = ("schema", "hydra")
"""Config groups that are plumbing, not choices: stored schemas and Hydra's own; hidden from ``--help``."""


def _refusal(override: str, problem: str, value: str, accepted: Sequence[str], label: str) -> str:
    """``<override>: <problem>; did you mean '<closest>'? (<label>: a, b, c)`` (no suggestion when none is close)."""
    close = difflib.get_close_matches(value, list(accepted), n=1, cutoff=0.6)
    suggestion = f"; did you mean '{close[0]}'?" if close else ""
    return f"{override}: {problem}{suggestion} ({label}: {', '.join(accepted)})"


def group_options(conf: Path, group: str) -> list[str]:
    """The options of config group ``group`` (``variant/he2015`` too): its YAML files, without the suffix."""
    directory = conf / group
    return sorted(str(path.relative_to(directory).with_suffix("")) for path in directory.rglob("*.yaml"))


def user_groups(conf: Path) -> list[str]:
    """Every config group a user chooses from (nested ones as ``variant/he2015``), internal ones left out."""
    groups = set()
    for path in conf.rglob("*.yaml"):
        group = str(path.parent.relative_to(conf))
        if group != "." and group.split("/")[0] not in INTERNAL_GROUPS:
            groups.add(group)
    return sorted(groups)


def _class_source(target: str) -> ast.ClassDef | None:
    """The class ``lightning_gradstab.<Name>`` as parsed from its source (None: not the suite's)."""
    package, _, name = target.rpartition(".")
    if package != "lightning_gradstab":
        return None
    spec = importlib.util.find_spec("lightning_gradstab")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    exports = _exports(root / "__init__.py")
    module = exports.get(name)
    if module is None:
        return None
    source = root.joinpath(*module.split(".")[1:]).with_suffix(".py")
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    return None


def _init(target: str) -> ast.FunctionDef | None:
    node = _class_source(target)
    items = [] if node is None else node.body
    return next((item for item in items if isinstance(item, ast.FunctionDef) and item.name == "__init__"), None)


@cache
def callback_options(target: str) -> tuple[str, ...] | None:
    """The constructor arguments of ``lightning_gradstab.<Name>``, read from the source (None: not the suite's)."""
    init = _init(target)
    if init is None:
        return None
    return tuple(argument.arg for argument in init.args.args[1:] + init.args.kwonlyargs)


@cache
def config_options(target: str) -> tuple[str, str, tuple[str, ...]] | None:
    """``(argument, class, its fields)`` of the suite dataclass a constructor takes as ``config`` (its annotation
    names it first, e.g. ``PolicyConfig | Mapping[str, Any] | None``); None when it takes none."""
    init = _init(target)
    arguments = [] if init is None else init.args.args[1:] + init.args.kwonlyargs
    for argument in arguments:
        if argument.arg == "config" and argument.annotation is not None:
            name = ast.unparse(argument.annotation).split("|")[0].strip().strip("'\"")
            node = _class_source(f"lightning_gradstab.{name}")
            if node is not None:
                fields = [item.target.id for item in node.body
                          if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)]
                return argument.arg, name, tuple(fields)
    return None


def _exports(init: Path) -> dict[str, str]:
    for node in ast.walk(ast.parse(init.read_text())):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets):
                return ast.literal_eval(node.value)
    return {}


def _gradstab_entries(conf: Path) -> dict[str, str]:
    """Suite entry name -> ``_target_``, over every option of the ``gradstab`` group."""
    from omegaconf import OmegaConf

    entries: dict[str, str] = {}
    for path in sorted((conf / "gradstab").glob("*.yaml")):
        for entry, node in (OmegaConf.to_container(OmegaConf.load(path)) or {}).items():
            if isinstance(node, dict) and "_target_" in node:
                entries[entry] = node["_target_"]
    return entries


def check_overrides(overrides: Sequence[str], conf: Path) -> str | None:
    """The first problem in ``overrides`` as one line, or None when they are fine as far as this can tell."""
    groups = user_groups(conf)
    entries: dict[str, str] | None = None
    for override in overrides:
        if override.startswith("-") or "=" not in override:
            continue
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        values = [v.strip() for v in value.split(",")] if not value.startswith(("range(", "glob(", "[", "{")) else []
        if key in groups:
            options = group_options(conf, key)
            for choice in values:
                if choice not in options and choice != "null":
                    return _refusal(override, f"config group '{key}' has no option '{choice}'", choice, options,
                                    "options")
            continue
        parts = key.split(".")
        if parts[0] == "gradstab" and len(parts) >= 2:
            entries = _gradstab_entries(conf) if entries is None else entries
            if parts[1] not in entries:
                return _refusal(override, f"the suite has no entry '{parts[1]}'", parts[1], list(entries), "entries")
            options = callback_options(entries[parts[1]])
            nested = config_options(entries[parts[1]])
            if nested is not None and len(parts) >= 4 and parts[2] == nested[0]:
                argument, name, fields = nested
                if parts[3] not in (*fields, "_target_"):
                    return _refusal(override, f"gradstab.{parts[1]}.{argument} ({name}) has no option '{parts[3]}'",
                                    parts[3], fields, "options")
                continue
            # a field of the nested config given directly: the constructor's deprecated spelling, which still works
            moved = () if nested is None else nested[2]
            if len(parts) >= 3 and options is not None and parts[2] not in (*options, *moved, "_target_"):
                name = entries[parts[1]].rpartition(".")[2]
                return _refusal(override, f"gradstab.{parts[1]} ({name}) has no option '{parts[2]}'", parts[2], options,
                                "options")
        elif parts[0] == "model" and len(parts) == 2 and parts[1] in MODEL_CHOICES:
            accepted = MODEL_CHOICES[parts[1]]
            for choice in values:
                if choice not in accepted:
                    return _refusal(override, f"'{key}' has no choice '{choice}'", choice, accepted, "choices")
    return None
