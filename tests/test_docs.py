"""The documents are true to the code: their code runs, they name every public function, and
the generated API reference is current.

Code blocks. Every fenced block tagged ``python`` in README.md, ARCHITECTURE.md, UTILITIES.md
and EXAMPLES.md is executed, except an *excerpt*: a block whose preceding non-blank line is an
HTML comment ``<!-- excerpt: <path> -->``. An excerpt is the exact text of that file, which a
test runs (an example script, which tests/test_examples.py runs, or a test file): lines equal to
``# ...`` cut it into chunks, and each chunk must be a contiguous run of the file's lines
(indentation shifted as a whole), the chunks in the file's order. So an excerpt cannot drift from
code that runs. No python block may be skipped otherwise (``<!-- not-run: reason -->`` is kept
for other languages only). The blocks of one document run **in order in one shared namespace**,
like the cells of a notebook, so a block may use names that earlier blocks of the same document
defined; each document starts from a fresh namespace in a fresh temporary working directory
(files the blocks write land there). The environment has ``HF_HUB_OFFLINE=1`` (tests/conftest.py):
runnable blocks use ``rlprim.testing``'s tiny models, never a hub download, and must stay fast on
CPU. Fences must be three backticks at the start of a line and every block must name its
language, so a Python block cannot slip through untested under another tag.

Coverage (as rlax's documentation check does): every name in ``rlprim.__all__``,
``rlprim.testing.__all__`` and ``rlprim.tasks.__all__`` has an entry in ARCHITECTURE.md, and the
API reference section equals what ``scripts/gen_api_reference.py`` renders from the code now.
The extension-point tables are checked against the signatures: every function a row lists
really takes the row's parameter.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import traceback
from pathlib import Path
from typing import NamedTuple

import pytest

import rlprim
import rlprim.tasks
import rlprim.testing

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("ARCHITECTURE.md", "README.md", "UTILITIES.md", "EXAMPLES.md")
FENCE = re.compile(r"^```(\S*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.*?)\s*-->$")
EXCERPT = re.compile(r"^<!--\s*excerpt:\s*(\S+)\s*-->$")
ELISION = "# ..."


class CodeBlock(NamedTuple):
    language: str
    source: str
    line: int  # 1-based line of the opening fence
    not_run_reason: str | None
    excerpt_of: str | None = None  # a path relative to the repository root


def read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def code_blocks(text: str) -> list[CodeBlock]:
    """Fenced blocks in order; a ``<!-- not-run: ... -->`` line right before one marks it."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        if i == len(lines):
            raise AssertionError(f"the code block opened at line {start + 1} is never closed")
        previous = start - 1
        while previous >= 0 and not lines[previous].strip():
            previous -= 1
        marker = lines[previous].strip() if previous >= 0 else ""
        not_run, excerpt = NOT_RUN.match(marker), EXCERPT.match(marker)
        blocks.append(
            CodeBlock(
                language=opening.group(1),
                source="\n".join(lines[start + 1 : i]) + "\n",
                line=start + 1,
                not_run_reason=not_run.group(1) if not_run else None,
                excerpt_of=excerpt.group(1) if excerpt else None,
            )
        )
        i += 1
    return blocks


def generated_section(text: str) -> tuple[str, str]:
    """``(hand_written, generated)`` parts of ARCHITECTURE.md."""
    start, end = "<!-- api-reference:start -->", "<!-- api-reference:end -->"
    head, rest = text.split(start, 1)
    generated, tail = rest.split(end, 1)
    return head + tail, generated


# --------------------------------------------------------------------------- code blocks


def test_block_parser_reads_languages_markers_and_lines():
    text = (
        "intro\n```python\nx = 1\n```\n\n<!-- not-run: needs a GPU -->\n\n```python\ny\n```\n"
        "```text\nformula\n```\n"
    )
    blocks = code_blocks(text)
    assert [(b.language, b.line, b.not_run_reason) for b in blocks] == [
        ("python", 2, None),
        ("python", 8, "needs a GPU"),
        ("text", 11, None),
    ]
    assert blocks[0].source == "x = 1\n"
    with pytest.raises(AssertionError, match="never closed"):
        code_blocks("```python\nx = 1\n")


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_block_names_its_language_and_every_skip_gives_a_reason(document):
    blocks = code_blocks(read(document))
    assert blocks, f"{document} has no code block"
    untagged = [b.line for b in blocks if not b.language]
    assert untagged == [], f"{document}: blocks without a language at lines {untagged}"
    python_aliases = [b.line for b in blocks if b.language in ("py", "python3", "pycon")]
    assert python_aliases == [], f"{document}: tag Python blocks `python` (lines {python_aliases})"
    no_reason = [b.line for b in blocks if b.not_run_reason is not None and not b.not_run_reason]
    assert no_reason == [], f"{document}: not-run markers without a reason before lines {no_reason}"


def _chunks(lines: list[str]) -> list[list[str]]:
    """The block's lines cut at ``# ...`` elisions, blank lines at each chunk's ends dropped."""
    chunks, current = [], []
    for line in [*lines, ELISION]:
        if line.strip() == ELISION:
            while current and not current[-1].strip():
                current.pop()
            while current and not current[0].strip():
                current.pop(0)
            if current:
                chunks.append(current)
            current = []
        else:
            current.append(line)
    return chunks


def _find_chunk(chunk: list[str], source: list[str], start: int) -> int | None:
    """The first index ≥ ``start`` where ``chunk`` is a contiguous run of ``source``, every
    line shifted right by the same indentation; ``None`` if there is none."""
    first = chunk[0]
    for i in range(start, len(source) - len(chunk) + 1):
        if not source[i].endswith(first) or source[i][: len(source[i]) - len(first)].strip():
            continue
        indent = source[i][: len(source[i]) - len(first)]
        if all(
            (source[i + j] == indent + line) if line.strip() else not source[i + j].strip()
            for j, line in enumerate(chunk)
        ):
            return i
    return None


def excerpt_mismatch(block_source: str, file_source: str) -> str | None:
    """Why ``block_source`` is not an exact excerpt of ``file_source`` (``None`` if it is)."""
    chunks = _chunks(block_source.splitlines())
    if not chunks:
        return "the excerpt is empty"
    source, position = file_source.splitlines(), 0
    for chunk in chunks:
        found = _find_chunk(chunk, source, position)
        if found is None:
            return f"the lines starting {chunk[0].strip()!r} are not a contiguous run of the file there"
        position = found + len(chunk)
    return None


def files_run_by_tests() -> set[str]:
    """Paths (from the root) of files some test executes: every example script (tests/
    test_examples.py checks it runs them all), the test files themselves and the library."""
    return {
        *(f"examples/{p.name}" for p in (ROOT / "examples").glob("*.py")),
        *(f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")),
        *(p.relative_to(ROOT).as_posix() for p in (ROOT / "rlprim").rglob("*.py")),
    }


def test_excerpt_check_accepts_exact_text_and_catches_drift():
    source = "def main():\n    a = 1\n    b = 2\n\n    c = a + b\n    return c\n"
    assert excerpt_mismatch("a = 1\nb = 2\n", source) is None  # dedented as a whole
    assert excerpt_mismatch("a = 1\n# ...\nreturn c\n", source) is None
    assert excerpt_mismatch("a = 1\nc = a + b\n", source) is not None  # a silent gap
    assert excerpt_mismatch("a = 1\nb = 3\n", source) is not None  # a changed value
    assert excerpt_mismatch("c = a + b\n# ...\na = 1\n", source) is not None  # reordered
    assert excerpt_mismatch("a = 1\n  b = 2\n", source) is not None  # re-indented line
    blocks = code_blocks("<!-- excerpt: examples/x.py -->\n```python\na = 1\n```\n")
    assert blocks[0].excerpt_of == "examples/x.py" and blocks[0].not_run_reason is None


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_python_block_runs_or_is_an_exact_excerpt_of_code_that_runs(document):
    run_by_tests = files_run_by_tests()
    problems = []
    for block in code_blocks(read(document)):
        if block.language != "python":
            continue
        if block.not_run_reason is not None:
            problems.append(f"line {block.line}: a python block may not be not-run")
        elif block.excerpt_of is not None:
            if block.excerpt_of not in run_by_tests:
                problems.append(f"line {block.line}: {block.excerpt_of} is not a file tests run")
                continue
            why = excerpt_mismatch(block.source, (ROOT / block.excerpt_of).read_text("utf-8"))
            if why:
                problems.append(f"line {block.line}: not an excerpt of {block.excerpt_of}: {why}")
    assert problems == [], f"{document}:\n" + "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("document", DOCUMENTS)
def test_python_blocks_run_in_order_in_one_namespace(document, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs:{document}"}
    runnable = [
        b for b in code_blocks(read(document))
        if b.language == "python" and not b.not_run_reason and not b.excerpt_of
    ]
    assert runnable, f"{document} has no runnable python block"
    for block in runnable:
        # Padding with newlines makes traceback line numbers those of the document.
        code = compile("\n" * block.line + block.source, document, "exec")
        failure = None
        try:
            exec(code, namespace)
        except Exception:
            failure = traceback.format_exc()
        if failure is not None:
            pytest.fail(
                f"{document}: the python block at line {block.line} failed:\n{failure}",
                pytrace=False,
            )


# --------------------------------------------------------------------------- coverage


def public_names() -> list[str]:
    return [*rlprim.__all__, *rlprim.testing.__all__, *rlprim.tasks.__all__]


def test_architecture_has_an_entry_for_every_public_name():
    text = read("ARCHITECTURE.md")
    missing = [n for n in public_names() if not re.search(rf"^- `{re.escape(n)}\b", text, re.M)]
    assert missing == [], f"ARCHITECTURE.md has no entry for {missing}"


def test_coverage_check_would_catch_a_missing_name():
    text = read("ARCHITECTURE.md")
    name = "compute_gae"
    assert re.search(rf"^- `{name}\b", text, re.M)
    stripped = re.sub(rf"^- `{name}\b.*$", "", text, flags=re.M)
    assert not re.search(rf"^- `{name}\b", stripped, re.M)


def test_extension_point_protocols_are_described_by_hand():
    hand_written, _ = generated_section(read("ARCHITECTURE.md"))
    protocols = rlprim.protocols.__all__
    missing = [p for p in protocols if f"`{p}`" not in hand_written]
    assert missing == [], f"§4 of ARCHITECTURE.md does not name the protocols {missing}"


def _load_generator_script():
    path = ROOT / "scripts" / "gen_api_reference.py"
    spec = importlib.util.spec_from_file_location("gen_api_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_section_is_current():
    script = _load_generator_script()
    assert script.main(["--check"]) == 0, "run `python scripts/gen_api_reference.py`"


def test_api_reference_check_fails_on_a_stale_section(tmp_path):
    script = _load_generator_script()
    stale = read("ARCHITECTURE.md").replace("- `compute_gae(", "- `compute_gae_renamed(", 1)
    path = tmp_path / "ARCHITECTURE.md"
    path.write_text(stale, encoding="utf-8")
    assert script.main(["--check", "--path", str(path)]) == 1
    assert script.main(["--path", str(path)]) == 0  # rewrites the section in place
    assert path.read_text(encoding="utf-8") == read("ARCHITECTURE.md")


def test_api_reference_follows_the_flat_face_order():
    script = _load_generator_script()
    modules = script.flat_face_modules()
    spliced = [n for m in modules for n in importlib.import_module(m).__all__]
    assert spliced == list(rlprim.__all__)


# --------------------------------------------------------------------------- extension points


def _resolve(name: str):
    for namespace in (rlprim, rlprim.tasks, rlprim.testing):
        if hasattr(namespace, name):
            return getattr(namespace, name)
    raise AssertionError(f"`{name}` in an extension-point table is not a public rlprim name")


def extension_point_rows(text: str) -> list[tuple[list[str], list[str]]]:
    """``(parameters, functions)`` of each row of the tables in §4 of ARCHITECTURE.md."""
    section = text.split("## 4. Extension points", 1)[1].split("\n## 5.", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) < 2 or cells[0] in ("Parameter", "") or set(cells[0]) <= {"-"}:
            continue
        parameters = re.findall(r"`(\w+)`", cells[0].split("(")[0])
        functions = re.findall(r"`(\w+)`", cells[1])
        rows.append((parameters, functions))
    return rows


def test_extension_point_tables_list_real_parameters():
    rows = extension_point_rows(read("ARCHITECTURE.md"))
    assert len(rows) >= 30
    wrong = []
    for parameters, functions in rows:
        assert parameters and functions, (parameters, functions)
        for name in functions:
            obj = _resolve(name)
            if isinstance(obj, type) and hasattr(obj, "_fields"):
                accepted = set(obj._fields)
            else:
                accepted = set(inspect.signature(obj).parameters)
            if not accepted & set(parameters):
                wrong.append(f"{name} takes none of {parameters}")
    assert wrong == []
