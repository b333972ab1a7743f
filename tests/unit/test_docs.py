"""Every `metasft` command line and config snippet in README.md and docs/ is valid as written:
the command parses with the real CLI, every `key=value` override and shipped config name
validates against the schema, and the bench YAML snippet loads. Commands that need no model or
data (`metasft configs ...`) are run."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from metasft.cli import build_parser, main
from metasft.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def command_lines():
    for doc in DOCS:
        for block in re.findall(r"```(?:bash)?\n(.*?)```", doc.read_text(), flags=re.S):
            joined = block.replace("\\\n", " ")
            for line in joined.splitlines():
                line = line.split(" #", 1)[0].strip()
                if "metasft " not in line or line.startswith(("#", "python")):
                    continue
                tokens = shlex.split(line)
                if tokens[0] == "torchrun":
                    tokens = tokens[tokens.index("metasft") + 1:]
                elif tokens[0] == "make":
                    continue
                else:
                    tokens = tokens[1:]
                yield pytest.param(tokens, id=f"{doc.name}: {' '.join(tokens)[:60]}")


@pytest.mark.parametrize("tokens", list(command_lines()))
def test_documented_command_is_valid(tokens, capsys):
    args = build_parser().parse_args(tokens)
    if args.command == "train":
        path = args.config if args.config and Path(args.config).exists() else None
        load_config(path=path, name=args.config_name, overrides=args.overrides)
    if args.command == "configs":
        assert main(tokens) == 0


def test_docs_have_commands():
    assert len(list(command_lines())) >= 20


def test_bench_yaml_snippet_loads(tmp_path):
    from metasft.bench import load_bench_config

    text = (ROOT / "docs" / "bench.md").read_text()
    snippet = re.search(r"```yaml\n(.*?)```", text, flags=re.S).group(1)
    path = tmp_path / "bench.yaml"
    path.write_text(snippet)
    cfg = load_bench_config(path)
    assert cfg.methods and yaml.safe_load(snippet)["n_shots"] == cfg.n_shots


def test_shipped_config_snippets_in_docs_exist():
    from metasft.config import shipped_config_names

    names = set(shipped_config_names())
    for doc in DOCS:
        for name in re.findall(r"--config-name ([a-z0-9][a-z0-9_.-]*[a-z0-9])", doc.read_text()):
            assert name in names, f"{doc.name}: unknown shipped config {name}"
