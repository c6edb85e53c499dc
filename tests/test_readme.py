import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    """The README's Python API block runs as written (bundled model included)."""
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace = {}
    exec(compile(block, str(README), "exec"), namespace)
    assert namespace["result"].labels.max() > 0
    assert namespace["kept"].max() > 0


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    command = re.search(r"# set up and run the tests.*\n(.*)\n", README.read_text()).group(1)
    assert command.strip() in ci


def test_readme_command_line_flags_exist():
    """Every flag the README's command-line block shows is one the parser takes, for that command."""
    from cp3d.cli import build_parser

    block = re.search(r"## Command line\n\n```bash\n(.*?)```", README.read_text(), re.S).group(1)
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for line in block.splitlines():
        name = line.split()[1]
        if name == "train":  # parsed by cp3d.model.train.main, which builds its parser inline
            continue
        flags = set(re.findall(r"(--[a-z-]+|-o)\b", line))
        actions = parser._actions if name.startswith("-") else commands[name]._actions  # cp3d --version
        known = {s for a in actions for s in a.option_strings}
        assert flags <= known, (name, flags - known)
