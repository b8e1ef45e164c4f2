"""The docs cannot drift from the code: their commands run, their numbers are quoted from results files.

- Every line of every ```bash block in README.md and docs/*.md is checked by what it is: ``python
  examples/train.py`` overrides are composed with Hydra's compose API (each job of a ``-m`` sweep), ``gradstab
  audit`` runs on a tiny model, ``pip install`` extras exist in pyproject.toml, scripts and their flags exist.
  A command no checker knows fails the test: add a checker rather than an unchecked command.
- Every inline Hydra override in the prose (`` `model.init=he` ``, `` `~gradstab.advisor` ``) is composed, and
  the ``gradstab`` callbacks it configures are built.
- Every table is either a measured table quoted verbatim between ``<!-- results: PATH -->`` and
  ``<!-- /results -->`` from the results file the measuring script wrote (which names its command), or a
  reference table whose header is listed in ``REFERENCE_TABLES``. A number typed by hand fails either way.
- Neither docs nor code mention files or documents outside the project.
"""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
import tomllib
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from torch import nn

from examples.schema import register_schemas

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
ROOT_KEYS = {
    "task", "model", "optim", "gradstab", "trainer", "logger", "experiment", "variant", "hydra", "seed", "name",
    "cpu_threads", "stop_after_nonfinite_steps",
}
MAX_JOBS_COMPOSED = 12  # per documented sweep: enough to reach every value of every swept key

REFERENCE_TABLES = {
    # headers of tables that state what the code does (tags, rungs, codes, fields, options), not measurements
    "| tag (under `gradstab/`) | when | meaning |",
    "| level | rung | action on an anomalous step |",
    "| evidence | anomaly | rule | default | why |",
    "| evidence | highest rung it can reach | why |",
    "| code | finds |",
    "| file | written by | where |",
    "| preset | published result | measured (docs/examples.md) |",
    "| set-up | status | cell (`tests/test_matrix.py`) | notes |",
    "| fault | outcome | record |",
    "| code | severity | when | recommendation names |",
    "| field | type | meaning |",
    "| `task=` | data | `model=` | what it is for |",
    "| panel | tags | how to read it |",
    "| signal | rule | default | why |",
    "| level | rung | on an anomalous step | budget (default) |",
}

register_schemas()


def _strip_fences(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.DOTALL)


def bash_lines() -> list[tuple[str, str]]:
    """``(doc, command)`` for every command of every ```bash block (comments dropped, ``&&`` chains split)."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"(^|\s)#.*$", "", line).strip()
                found += [(doc.name, part.strip()) for part in line.split("&&") if part.strip()]
    return found


def _is_override(token: str) -> bool:
    key = token.lstrip("+~").split("=", 1)[0]
    root = re.split(r"[./]", key, maxsplit=1)[0]
    return root in ROOT_KEYS and ("=" in token or token.startswith("~"))


def inline_overrides() -> list[tuple[str, str]]:
    """``(doc, span)`` for every inline code span of the prose made only of Hydra overrides."""
    found = []
    for doc in DOCS:
        for span in re.findall(r"`([^`]+)`", _strip_fences(doc.read_text())):
            tokens = span.split()
            if not tokens or "<" in span or "..." in span or any(t.endswith("=") for t in tokens):
                continue
            if all(_is_override(token) for token in tokens):
                found.append((doc.name, " ".join(tokens)))
    return found


def inline_commands() -> list[tuple[str, str]]:
    """``(doc, span)`` for inline spans that are whole commands (``python examples/train.py ...``, ...)."""
    found = []
    for doc in DOCS:
        for span in re.findall(r"`([^`]+)`", _strip_fences(doc.read_text())):
            span = " ".join(span.split())
            if "<" in span or "..." in span:
                continue
            if span.startswith(("python examples/train.py ", "gradstab audit ", "torchrun ", "srun python ")):
                found.append((doc.name, span))
    return found


def compose_jobs(overrides: list[str]) -> list:
    """Compose the config of each job the overrides describe (a comma list or range is a sweep)."""
    parser = OverridesParser.create()
    axes = []
    for override in parser.parse_overrides(overrides):
        text = override.input_line
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
            prefix = text.split("=", 1)[0]
            axes.append([f"{prefix}={value}" for value in values])
        else:
            axes.append([text])
    launcher = [o for o in overrides if o.startswith("hydra/launcher=")]
    if "hydra/launcher=slurm" in launcher:
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm launcher needs its plugin")
    jobs = list(itertools.product(*axes)) or [()]
    configs = []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for job in jobs[:MAX_JOBS_COMPOSED]:
            configs.append(compose("config", overrides=list(job), return_hydra_config=True))
    return configs


def _check_gradstab_builds(configs: list, overrides: list[str]) -> None:
    if not any(o.lstrip("+~").startswith("gradstab") for o in overrides):
        return
    for cfg in configs:
        for name, node in cfg.gradstab.items():
            callback = instantiate(node)  # the callbacks validate their arguments: a bad value raises here
            assert callback is not None, name


def check_train(arguments: list[str]) -> None:
    overrides = [a for a in arguments if not a.startswith("-")]
    unknown = [a for a in arguments if a.startswith("-") and a not in ("-m", "--multirun")]
    assert not unknown, f"examples/train.py has no option {unknown}"
    assert all(_is_override(o) for o in overrides), f"not a Hydra override among {overrides}"
    _check_gradstab_builds(compose_jobs(overrides), overrides)


def tiny_mlp() -> nn.Module:
    """The model documented ``gradstab audit`` commands run on (a 6-layer Xavier ReLU MLP)."""
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    for layer in layers[::2]:
        nn.init.xavier_normal_(layer.weight)
    return nn.Sequential(*layers)


def check_audit(arguments: list[str], tmp_path: Path) -> None:
    from lightning_gradstab.cli import EXIT_USAGE, build_parser, main

    target = arguments[1]
    try:
        from lightning_gradstab.cli import _load_factory

        _load_factory(target)
    except (ImportError, AttributeError, ValueError):
        target = "tests.test_docs:tiny_mlp"  # a placeholder like pkg.mod:factory: run the documented flags on ours
    argv = ["audit", target, *arguments[2:]]
    build_parser().parse_args(argv)  # a usage error exits here with argparse's message
    if "--json" not in argv:
        argv += ["--json", str(tmp_path / "audit.json")]
    else:
        argv[argv.index("--json") + 1] = str(tmp_path / "audit.json")
    shape = argv[argv.index("--input-shape") + 1]
    if target == "tests.test_docs:tiny_mlp":
        argv[argv.index("--input-shape") + 1] = shape.split(",")[0] + ",64"  # our model's width
    assert main(argv) != EXIT_USAGE


def check_pip(arguments: list[str]) -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    dependency_text = str(PYPROJECT["project"])
    cpu_index = "--index-url" in arguments and "download.pytorch.org/whl/cpu" in " ".join(arguments)
    tokens = iter(arguments[2:])
    for token in tokens:
        if token in ("--index-url", "--extra-index-url"):
            assert next(tokens).startswith("https://")
        elif token in ("-e", "--editable"):
            spec = next(tokens)
            match = re.fullmatch(r"\.(\[([\w,-]+)\])?", spec)
            assert match, f"pip install -e {spec}: install the checkout as `-e \".[extra]\"`"
            for extra in (match.group(2) or "").split(","):
                assert not extra or extra in extras, f"pyproject.toml has no extra {extra!r}"
        elif token == "torch" or token.startswith("torch=="):
            bare_torch_message = "a bare `pip install torch` pulls a CUDA build: pin or use the CPU index"
            assert token != "torch" or cpu_index, bare_torch_message
        else:
            assert token.split("=")[0].split(">")[0] in dependency_text, f"{token} is no dependency of the project"


def check_command(command: str, tmp_path: Path) -> None:
    arguments = shlex.split(command)
    head = arguments[:2]
    if head == ["python", "examples/train.py"]:
        check_train(arguments[2:])
    elif arguments[0] == "torchrun" or head == ["srun", "python"]:
        script = next(index for index, a in enumerate(arguments) if a.endswith("examples/train.py"))
        check_train(arguments[script + 1 :])
    elif head == ["gradstab", "audit"]:
        check_audit(arguments[1:], tmp_path)
    elif head == ["pip", "install"]:
        check_pip(arguments)
    elif head == ["python", "-m"] and arguments[2] == "pytest":
        for path in arguments[3:]:
            assert path.startswith("-") or (REPO / path.split("::")[0]).exists(), f"{path} does not exist"
    elif head == ["ruff", "check"]:
        assert arguments[2:] in ([], ["."])
    elif arguments[0] == "mypy":
        # the package it checks exists, and its settings live in pyproject.toml (what CI runs is what is documented)
        assert arguments[1:] == ["lightning_gradstab"] and (REPO / "lightning_gradstab").is_dir()
        assert "[tool.mypy]" in (REPO / "pyproject.toml").read_text()
    elif arguments[0] == "tensorboard":
        assert arguments[1] == "--logdir" and len(arguments) == 3, "tensorboard --logdir DIR"
    elif (arguments[0] == "python" and arguments[1].endswith(".py")) or arguments[0].startswith("scripts/"):
        script = REPO / (arguments[1] if arguments[0] == "python" else arguments[0])
        assert script.is_file(), f"{script.relative_to(REPO)} does not exist"
        source = script.read_text()
        for flag in (a.split("=")[0] for a in arguments if a.startswith("--")):
            assert f'"{flag}"' in source or f"'{flag}'" in source, f"{script.name} has no option {flag}"
    else:
        pytest.fail(f"no checker for the documented command {command!r}: add one to tests/test_docs.py")


@pytest.mark.parametrize(("doc", "command"), bash_lines() + inline_commands())
def test_documented_command_works(doc, command, tmp_path):
    check_command(command, tmp_path)


@pytest.mark.parametrize(("doc", "overrides"), inline_overrides())
def test_documented_override_composes(doc, overrides):
    check_train(overrides.split())


def test_the_checkers_catch_what_used_to_go_wrong(tmp_path):
    with pytest.raises(Exception, match="histogram_every_n_steps"):  # needs `+`: not a key of gradstab/full
        check_train(["gradstab.monitor.histogram_every_n_steps=200"])
    with pytest.raises(SystemExit):  # the shape is one argument, "32,64"
        check_audit(["audit", "pkg.mod:factory", "--input-shape", "32", "64"], tmp_path)
    with pytest.raises(AssertionError, match="CUDA"):
        check_pip(["pip", "install", "torch"])
    with pytest.raises(pytest.fail.Exception, match="no checker"):
        check_command("curl https://example.com | sh", tmp_path)


def _results_blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"<!-- results: (\S+) -->\n(.*?)<!-- /results -->", text, flags=re.DOTALL)


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_quoted_result_is_verbatim_in_its_results_file(doc):
    text = doc.read_text()
    assert text.count("<!-- results:") == text.count("<!-- /results -->"), "unbalanced results markers"
    for path, block in _results_blocks(text):
        source = REPO / path
        assert source.is_file(), f"{doc.name} quotes {path}, which does not exist"
        quoted = source.read_text().splitlines()
        assert any(re.search(r"`python [^`]+`", line) for line in quoted), f"{path} does not name its command"
        for line in block.splitlines():
            assert not line.strip() or line in quoted, f"{doc.name}: not in {path}:\n{line}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_table_is_a_quoted_result_or_a_reference_table(doc):
    text = doc.read_text()
    quoted = {line for _, block in _results_blocks(text) for line in block.splitlines()}
    lines = _strip_fences(text).splitlines()
    for index, line in enumerate(lines):
        starts_table = line.startswith("|") and (index == 0 or not lines[index - 1].startswith("|"))
        if starts_table and line not in quoted:
            assert line in REFERENCE_TABLES, (
                f"{doc.name}: the table under {line!r} is neither quoted from a results file (wrap it in "
                "<!-- results: PATH --> ... <!-- /results -->) nor a known reference table"
            )


OUTSIDE = re.compile(r"shared/|PAPERS\.md|the issue|issue #\d|the brief", re.IGNORECASE)


def test_docs_and_code_mention_nothing_outside_the_project():
    files = [*DOCS]
    for folder in ("lightning_gradstab", "examples", "conf", "scripts", "benchmarks", "tests"):
        files += [p for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".md", ".yaml", ".sh")]
    offending = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in files
        if path != Path(__file__).resolve()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not offending, "cite papers and public projects instead:\n" + "\n".join(offending)
