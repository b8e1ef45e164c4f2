"""Module boundaries, checked on the source (AST): thin callbacks over a core that never imports them, and no
module reaching into another's private attributes or into a policy's internal ``state``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_gradstab"
CALLBACKS = PACKAGE / "callbacks"
CORE = (
    "stats", "running", "guard", "diagnosis", "report", "console", "fit_summary", "tensorboard",
    "guard_events", "adam_state", "per_tensor_clip", "logits", "distributed", "state_checks", "arguments", "compiled",
)

# Private attributes of third-party objects that have no public equivalent, each with the reason.
ALLOWED_PRIVATE = {
    # torch.amp.GradScaler: get_scale() reads a copy; restoring a rolled-back or collapsed scale in place needs
    # the tensors themselves (the scaler's own load_state_dict replaces them only before the first step)
    "_scale",
    "_growth_tracker",
    "_init_scale",
    "_per_optimizer_states",
    # torch's multi-tensor kernels, the ones torch.nn.utils.clip_grad_norm_ itself calls; no public alias
    "_foreach_norm",
    "_foreach_mul",
    "_foreach_mul_",
    "_foreach_sub",
    "_foreach_copy_",
    # the same kernels as torch.optim.Adam's foreach path, for adam_state's one fused pass over the moments
    "_foreach_add", "_foreach_add_", "_foreach_sub_", "_foreach_div", "_foreach_div_", "_foreach_neg",
    "_foreach_lerp", "_foreach_sqrt_", "_foreach_maximum_", "_foreach_clamp_min_",
    # a tensor's version counter (bumped by every in-place write): which buffers a forward wrote, with no sync
    "_version",
    # torch's C extension, for DisableTorchFunction: the diagnosis tracer's own probes must not be recorded
    "_C",
    # torch's abstract bases of every conv / norm / dropout variant, for isinstance
    "_ConvNd",
    "_NormBase",
    "_DropoutNd",
    # nn.init's own fan computation, which the init rules must match exactly
    "_calculate_fan_in_and_fan_out",
    # the storage base of a view (documented in torch's tensor-view notes), to tell views from copies
    "_base",
    # Lightning's optimizer wrapper (LightningOptimizer._optimizer) around the user's optimizer
    "_optimizer",
    # Lightning's logging step (what self.log uses); the loop exposes no public accessor
    "_batches_that_stepped",
    # where Lightning keeps the original methods of a torch.compile'd LightningModule
    "_compiler_ctx",
    # torch.compile's OptimizedModule keeps the eager module here (no public accessor)
    "_orig_mod",
}


def _modules(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def _name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{line}"


def _is_callback_module(module: str) -> bool:
    parts = module.split(".")
    return parts[:2] == ["lightning_gradstab", "callbacks"] and len(parts) >= 3 and not parts[2].startswith("_")


def test_no_callback_module_imports_another_callback_module():
    """Helper modules (``_shared``, ``_reporting``) included: they ask the callbacks through ``SuiteCallback``."""
    violations = []
    for path in _modules(CALLBACKS):
        own = _name(path)
        violations += [
            f"{_where(path, line)} imports {module}"
            for line, module in _imports(path)
            if _is_callback_module(module) and not module.startswith(own)
        ]
    assert violations == []


def test_no_core_module_imports_the_callbacks():
    violations = []
    for core in CORE:
        paths = _modules(PACKAGE / core) if (PACKAGE / core).is_dir() else [PACKAGE / f"{core}.py"]
        for path in paths:
            violations += [
                f"{_where(path, line)} imports {module}"
                for line, module in _imports(path)
                if module.startswith("lightning_gradstab.callbacks")
            ]
    assert violations == []


# Core modules that import Lightning, each inside the one function handed a Lightning object, never at the top:
# importing the core (the data model, the guard's state, diagnose) does not import Lightning.
LIGHTNING_INSIDE_A_FUNCTION = {
    "console": "recognises a trainer's Rich or TQDM progress bar, to print around it",
    "tensorboard": "warns on rank zero through Lightning's rank_zero_warn",
    "distributed": "recognises Lightning's FSDP, DeepSpeed and model-parallel strategies",
}


def test_the_core_imports_lightning_only_inside_the_functions_handed_a_lightning_object():
    violations = []
    for core in CORE:
        paths = _modules(PACKAGE / core) if (PACKAGE / core).is_dir() else [PACKAGE / f"{core}.py"]
        for path in paths:
            top_level = {node.lineno for node in ast.parse(path.read_text()).body}
            violations += [
                f"{_where(path, line)} imports {module}"
                for line, module in _imports(path)
                if module.split(".")[0] == "lightning"
                and (core not in LIGHTNING_INSIDE_A_FUNCTION or line in top_level)
            ]
    assert violations == []


def _private_reads(path: Path) -> list[str]:
    """``x._name`` and ``getattr(x, "_name")`` where ``x`` is not ``self``/``cls`` and the name is not allowed,
    and ``from lightning_gradstab... import _name``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            receiver, attribute = node.value, node.attr
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            receiver, attribute = node.args[0], node.args[1].value
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_gradstab"):
            found += [f"{_where(path, node.lineno)}: imports {a.name}" for a in node.names if a.name.startswith("_")]
            continue
        else:
            continue
        if not attribute.startswith("_") or attribute.startswith("__") or attribute in ALLOWED_PRIVATE:
            continue
        if isinstance(receiver, ast.Name) and receiver.id in ("self", "cls"):
            continue
        found.append(f"{_where(path, node.lineno)}: {ast.unparse(receiver)}.{attribute}")
    return found


def _policy_state_reads(path: Path) -> list[str]:
    """``<policy>.state`` outside the policy itself (``self.state``): the policy's internal counters, behind its public
    properties (the parts of the guard package that share them hold them as ``counters``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "state"
            and "polic" in ast.unparse(node.value)
            and not (isinstance(node.value, ast.Name) and node.value.id == "self")
        ):
            found.append(f"{_where(path, node.lineno)}: {ast.unparse(node)}")
    return found


def test_no_module_reads_another_modules_private_attributes():
    found = [f for path in _modules(PACKAGE) for f in _private_reads(path)]
    assert found == []


def test_no_module_but_the_policy_reads_policy_state():
    found = [f for path in _modules(PACKAGE) for f in _policy_state_reads(path)]
    assert found == []


def test_no_module_finds_the_guard_by_its_policies_attribute():
    found = []
    for path in _modules(PACKAGE):
        if path.parts[-2:] == ("callbacks", "guard.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            named = isinstance(node, ast.Constant) and node.value == "policies"
            read = isinstance(node, ast.Attribute) and node.attr == "policies" and ast.unparse(node.value) != "self"
            if named or read:
                found.append(_where(path, node.lineno))
    assert found == []


def _import_graph() -> dict[str, set[str]]:
    """Each module of the package -> the package modules it imports anywhere (functions included)."""
    modules = {_name(path): path for path in _modules(PACKAGE)}

    def module_of(imported: str) -> str | None:
        parts = imported.split(".")
        for end in range(len(parts), 0, -1):
            if (candidate := ".".join(parts[:end])) in modules:
                return candidate
        return None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {module_of(imported) for _, imported in _imports(path)}
        # a package's own __init__ is imported by any import of its modules: not an edge of a cycle
        graph[name] = {t for t in targets if t is not None and t != name and not name.startswith(f"{t}.")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycles_helper_modules_included():
    assert _cycles(_import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
