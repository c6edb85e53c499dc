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
