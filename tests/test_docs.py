"""The commands that README.md, docs/ and the scripts' own docstrings show use flags and config
fields that exist, so that a reader who copies one gets the run it describes."""
import ast
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {path.name: path for folder in ("experiments", "data_prep") for path in (ROOT / folder).glob("*.py")}
# A script's name (its folder optional, as prose names it), then its arguments up to a comment, a
# closing backtick or the end of the command (a backslash joins the next line).
COMMAND = re.compile(r"(?<![\w./-])(?:experiments/|data_prep/)?(\w+\.py)((?:\\\n|[^`#\n])*)")
FLAG = re.compile(r"(?<![\w-])--([A-Za-z_][\w.]*)")
ABSL_FLAGS = {"help", "helpfull", "flagfile"}
# A config file and its optional config string, as `--config` takes them.
CONFIG = re.compile(r"--config[\s=]+(configs/[\w/]+\.py)(?::([^\s`]+))?")


def _defined_flags(script: Path) -> set[str]:
    """The names the script gives absl's DEFINE_* calls (config_flags' included)."""
    return {node.args[0].value for node in ast.walk(ast.parse(script.read_text()))
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "").startswith("DEFINE")
            and node.args and isinstance(node.args[0], ast.Constant)}


def _has_field(config, path: str) -> bool:
    for name in path.split("."):
        if name not in config:
            return False
        config = config[name]
    return True


def _inline_code_on_one_line(markdown: str) -> str:
    """The text with each inline code span's line breaks made spaces (same length, so same lines)."""
    parts = markdown.split("```")  # odd parts are fenced blocks, whose lines are commands of their own
    return "```".join(part if k % 2 else re.sub(r"`[^`]+`", lambda m: m.group(0).replace("\n", " "), part)
                      for k, part in enumerate(parts))


def _documented_commands():
    """(file:line, script, its arguments) of every command README.md, docs/ and the scripts show."""
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(SCRIPTS.values())]
    for path in texts:
        text = path.read_text()
        scanned = _inline_code_on_one_line(text) if path.suffix == ".md" else text
        for match in COMMAND.finditer(scanned):
            if match.group(1) in SCRIPTS:
                line = text.count("\n", 0, match.start()) + 1
                yield f"{path.relative_to(ROOT)}:{line}", match.group(1), match.group(2)


def test_documented_commands_use_flags_and_config_fields_that_exist():
    from configs.paper import get_config

    config = get_config()
    unknown, checked = [], 0
    for where, script, arguments in _documented_commands():
        names = _defined_flags(SCRIPTS[script])
        for flag in FLAG.findall(arguments):
            checked += 1
            name, _, field = flag.partition(".")
            known = name in names or name in ABSL_FLAGS or (name.startswith("no") and name[2:] in names)
            if not known or (field and not _has_field(config, field)):
                unknown.append(f"{where}: {script} --{flag}")
    assert not unknown, "documented commands that would fail:\n" + "\n".join(unknown)
    assert checked > 100  # the pattern still finds the commands


def test_documented_configs_and_config_strings_load():
    from fll_jax.config_check import check_config

    loaded = 0
    for where, _, arguments in _documented_commands():
        for file, arg in CONFIG.findall(arguments):
            spec = importlib.util.spec_from_file_location("documented_config", ROOT / file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            try:
                config = module.get_config(arg or None)
                if "ablations" not in file:  # a sweep's config is checked point by point when it runs
                    check_config(config, data_source=False)
            except Exception as error:  # noqa: BLE001  (any failure is the finding, named below)
                raise AssertionError(f"{where}: --config {file}:{arg} fails: {error}") from error
            loaded += 1
    assert loaded > 20  # the pattern still finds the configs


def test_tests_the_docs_cite_exist():
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    cited = {(path.name, file, name) for path in texts
             for file, name in re.findall(r"(test_\w+\.py)::(test_\w+)", path.read_text())}
    defined = {path.name: set(re.findall(r"^def (test_\w+)\(", path.read_text(), re.M))
               for path in (ROOT / "tests").glob("test_*.py")}
    missing = sorted(f"{doc}: {file}::{name}" for doc, file, name in cited if name not in defined.get(file, ()))
    assert not missing, "tests the docs cite that do not exist:\n" + "\n".join(missing)
    assert len(cited) > 100  # the pattern still finds the citations
