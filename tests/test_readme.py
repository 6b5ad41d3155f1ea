"""Every code block of README.md runs as written, and every path it names exists.

The fenced blocks run in README order, all in one temporary working directory:

- ```python blocks are executed; a block whose preceding prose says "continuing" (as in
  "Continuing the example above") shares the previous Python block's namespace, every
  other block starts from an empty one (it must be self-contained);
- ```yaml blocks are parsed with ``umtam-merge``'s own loader and checked against the
  method registry (``build_plan``); one whose first line names a file (``# merge.yaml``)
  is written there for the commands that follow. Models a mergekit configuration names
  that no block made are stood in for by tiny safetensors folders made here;
- ```bash blocks run line by line: ``umtam-merge`` in process (exit status 0 required);
  any other command fails unless the block is marked skipped.

``<!-- readme-test: skip (reason) -->`` right before a block skips it (set-up commands,
the full demo); a skipped ``umtam-demo`` command still has its options parsed. A failure
names the block's README line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import traceback
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

_FENCE = re.compile(r"^```(\S*)\s*$")
_SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")


@dataclasses.dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    prose: str  # the text between the previous block and this one
    skip: str | None  # the reason, if marked skipped

    @property
    def continuing(self) -> bool:
        """Whether the paragraph right before the block says it continues the previous one."""
        paragraphs = [p for p in self.prose.split("\n\n") if p.strip()]
        return bool(paragraphs) and "continuing" in paragraphs[-1].lower()


def readme_blocks(text: str | None = None) -> list[Block]:
    lines = (README.read_text() if text is None else text).splitlines()
    blocks, prose, i = [], [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"README.md line {start + 1}: unclosed code block"
        text_before = "\n".join(prose)
        marker = _SKIP.fullmatch(prose[-1].strip()) if prose else None  # the line right before
        reason = marker["reason"] if marker else None
        blocks.append(Block(m.group(1), "\n".join(body) + "\n", start + 1, text_before, reason))
        prose = []
        i += 1
    return blocks


BLOCKS = readme_blocks()


# ----------------------------------------------------------------------------- runners


def _fake_hf_model(path: Path, seed: int) -> None:
    """A two-tensor Hugging Face style safetensors folder (stands in for a named model)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    tensors = {
        "encoder.layer.0.attention.self.query.weight": rng.normal(size=(8, 8)),
        "classifier.bias": rng.normal(size=(4,)),
    }
    save_file(
        {k: v.astype(np.float32) for k, v in tensors.items()}, str(path / "model.safetensors")
    )
    (path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))


class Runner:
    """Runs the README's blocks in order in one directory, recording each one's error."""

    def __init__(self, workdir: Path, blocks: list[Block]):
        self.workdir = workdir
        self.blocks = blocks
        self.errors: dict[int, str | None] = {}
        self.namespace: dict | None = None

    @contextlib.contextmanager
    def _inside(self):
        cwd = os.getcwd()
        os.chdir(self.workdir)
        try:
            yield
        finally:
            os.chdir(cwd)

    def run_until(self, index: int) -> str | None:
        for j in range(len(self.errors), index + 1):
            block = self.blocks[j]
            try:
                with self._inside():
                    getattr(self, f"_run_{block.lang or 'text'}", self._run_other)(block)
                self.errors[j] = None
            except BaseException as err:  # noqa: BLE001 - reported with the block's line
                if isinstance(err, KeyboardInterrupt):
                    raise
                self.errors[j] = "".join(traceback.format_exception(err, limit=-8))
        return self.errors[index]

    def _run_python(self, block: Block) -> None:
        if block.skip:
            self.namespace = None
            return
        if block.continuing:
            assert self.namespace is not None, "continues a Python block that did not run"
        else:
            self.namespace = {"__name__": "__readme__"}
        # Padded so that tracebacks give README.md's own line numbers.
        code = compile("\n" * block.line + block.code, str(README), "exec")
        exec(code, self.namespace)

    def _run_yaml(self, block: Block) -> None:
        from umtam_jax.cli import _mergekit, _yaml
        from umtam_jax.cli.merge import build_plan

        config = _yaml.load_yaml(block.code, f"README.md line {block.line}")
        if _mergekit.is_mergekit(config):
            paths = [config["base_model"]] + [m["model"] for m in config["models"]]
            for seed, path in enumerate(paths):
                if not Path(path).exists():
                    _fake_hf_model(Path(path), seed)
            plan_config = _mergekit.translate(config)
        else:
            plan_config = config
        if "output" not in plan_config:  # mergekit configurations take it from `-o`
            plan_config = {**plan_config, "output": "unused-output"}
        build_plan(plan_config)
        name = re.match(r"#\s*(\S+\.ya?ml)\s*$", block.code.splitlines()[0])
        if name and not block.skip:
            Path(name.group(1)).write_text(block.code)

    def _run_bash(self, block: Block) -> None:
        for number, line in enumerate(block.code.splitlines(), block.line + 1):
            argv = shlex.split(line, comments=True)
            if not argv:
                continue
            if block.skip:
                if argv[0] == "umtam-demo":  # not run, but its options must exist
                    from umtam_jax.cli.demo import _parser

                    _parser().parse_args(argv[1:])
                continue
            if argv[0] != "umtam-merge":
                raise AssertionError(
                    f"line {number}: no way to run {argv[0]!r} here; mark the block "
                    "<!-- readme-test: skip (reason) -->"
                )
            from umtam_jax.cli.merge import main

            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = main(argv[1:])
            assert status == 0, f"line {number}: {line!r} exited {status}: {err.getvalue()}"

    def _run_other(self, block: Block) -> None:
        if not block.skip:
            raise AssertionError(f"no runner for ```{block.lang} blocks; mark it skipped")


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return Runner(tmp_path_factory.mktemp("readme"), BLOCKS)


@pytest.mark.parametrize(
    "index", range(len(BLOCKS)), ids=[f"line{b.line}-{b.lang or 'text'}" for b in BLOCKS]
)
def test_readme_block_runs(runner, index):
    block = BLOCKS[index]
    error = runner.run_until(index)
    if error is not None:
        pytest.fail(f"README.md line {block.line} (```{block.lang} block) failed:\n{error}")
    if block.skip and block.lang == "python":
        pytest.skip(f"README.md line {block.line}: {block.skip}")


def test_blocks_are_found_and_few_are_skipped():
    langs = {b.lang for b in BLOCKS}
    assert {"python", "yaml", "bash"} <= langs, langs
    skipped = [b for b in BLOCKS if b.skip]
    assert len(skipped) <= 3, [(b.line, b.skip) for b in skipped]
    assert all(not b.skip for b in BLOCKS if b.lang == "python")


def test_a_failing_block_is_reported_with_its_line(tmp_path):
    blocks = readme_blocks(
        "```python\nx = 1\n```\n\nContinuing the example above:\n\n```python\ny = x\n```\n"
        "\nA new example:\n\n```python\nprint(x)\n```\n"
    )
    runner = Runner(tmp_path, blocks)
    assert runner.run_until(1) is None
    error = runner.run_until(2)  # not continuing: `x` is not defined there
    assert "NameError" in error and 'README.md", line 14' in error, error


def test_parser_reads_markers_and_continuations():
    blocks = readme_blocks(
        "Intro.\n\n```python\nx = 1\n```\n\nContinuing the example above:\n\n```python\n"
        "y = x\n```\n\n<!-- readme-test: skip (slow) -->\n```bash\nmake\n```\n"
    )
    assert [(b.lang, b.line, b.continuing, b.skip) for b in blocks] == [
        ("python", 3, False, None),
        ("python", 9, True, None),
        ("bash", 14, False, "slow"),
    ]


# ------------------------------------------------------------------------------ paths

_PATH = re.compile(
    r"(?<![\w./-])((?:\.ci|benchmarks|docs|examples|notebooks|scripts|tests|umtam_jax)"
    r"/[\w.*/-]*[\w*])"
)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_paths_and_links_exist():
    text = README.read_text()
    missing = []
    for path in sorted(set(_PATH.findall(text))):
        if not (list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
            missing.append(path)
    for link in _LINK.findall(text):
        if re.match(r"\w+://", link):
            continue
        target, _, anchor = link.partition("#")
        file = ROOT / target if target else README
        if not file.exists():
            missing.append(link)
        elif anchor:
            headings = re.findall(r"^#+\s+(.*)$", file.read_text(), re.MULTILINE)
            if anchor not in {_slug(h) for h in headings}:
                missing.append(link)
    assert not missing, f"README.md names paths that do not exist: {missing}"


def test_console_scripts_exist():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    used = set(re.findall(r"(?<![\w.-])(umtam-[a-z]+)(?![\w-])", README.read_text()))
    used -= {"umtam-lock", "umtam-new"}  # hidden names of checkpoint saves (.NAME.umtam-…)
    assert used <= set(scripts), used - set(scripts)
