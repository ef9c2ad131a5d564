"""How each language is syntax-checked, linted and run inside the sandbox.

All commands run inside the sandbox (see sandbox.py) with the source at /box/<source_name> and /box as
the working directory; interpreters are the system's (/usr/bin/python3, not the service's venv).

Memory limits per language, because RLIMIT_AS (address space) is not usable everywhere:
- every language gets RLIMIT_DATA = `Limits.memory_bytes`. It counts private writable memory (heaps,
  anonymous mappings, thread stacks) but not the huge PROT_NONE reservations V8 and the BEAM make at
  start-up, so node and elixir work under it and still fail cleanly when a program hogs memory;
- python and bash also get RLIMIT_AS = 2 x memory_bytes, which closes the one gap RLIMIT_DATA leaves
  (shared anonymous mappings, e.g. Python's `mmap.mmap(-1, n)`);
- node (V8 reserves ~0.7 GiB of address space for hello world, more with WebAssembly) and elixir (the
  BEAM reserves ~2 GiB for its super carrier) get no RLIMIT_AS.
These bind one process at a time. The whole job (every process, shared memory, tmpfs files) is
bounded by its memory cgroup where the host has a writable cgroup tree (cgroups.py); where it has
none, a shared mapping of a node or elixir job, or a child process that is not itself node/elixir, is
bounded by the host's or the Pod's limit, with the job first in line for the OOM killer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from singularity_stack import contract as c
from singularity_stack.genesis.sandbox import TOOLS_DIR, Limits, MiB
from singularity_stack.genesis.tools import PreparedTool, prepare_tool

log = logging.getLogger(__name__)


class UnsupportedLanguage(ValueError):
    """The caller asked for a language Genesis does not run."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unsupported language {name!r}; supported: {', '.join(sorted(LANGUAGES))}")
        self.name = name


class LintOutputError(ValueError):
    """The linter's output is not what it prints when it works: the lint did not happen."""


@dataclass(frozen=True)
class Linter:
    """A static checker that runs sandboxed like everything else; it reads the source, never executes it.

    A linter that cannot run is an error of the job, never "no findings" (runner.py).
    """

    tool: str  # name, and its file name under /opt/genesis/bin in the sandbox
    locate: Callable[[], str | None]  # host path of the executable, None when not installed
    args: tuple[str, ...]  # arguments before the source file name
    parse: Callable[[str], list[str]]  # the tool's stdout -> findings, one readable line each (LintOutputError)
    install_hint: str  # how to install it, for the error when it is missing
    env: Mapping[str, str] = field(default_factory=dict)

    def argv(self, source_name: str) -> list[str]:
        return [f"{TOOLS_DIR}/{self.tool}", *self.args, source_name]

    def prepared(self) -> PreparedTool:
        """Where the job's account finds this tool, or why it cannot run (prepared once per path)."""
        return prepare_tool(self.tool, self.locate(), self.install_hint)


@dataclass(frozen=True)
class Toolchain:
    """Commands and limits of one of the contract's languages. `run_argv` gets the limits to size runtime heaps."""

    name: c.Language
    syntax_argv: tuple[str, ...]
    run_argv: Callable[[Limits], tuple[str, ...]]
    # Lower-case fragments of stderr that mean "ran out of memory" in this runtime (checked on failure).
    memory_markers: tuple[str, ...]
    limit_address_space: bool
    # The interpreter compiles the whole file before it runs any of it, so a run of code that does not
    # compile runs none of it: the run is the syntax check, and the separate one is needed only when the run
    # fails (runner.py). Not bash, which runs each command as it reads it.
    compiles_before_running: bool
    linter: Linter | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def source_name(self) -> str:
        """The file the program is written to, /box/<source_name>: the contract's name for it."""
        return self.name.source_name

    def address_space_bytes(self, limits: Limits) -> int | None:
        """RLIMIT_AS for this language, or None when the runtime cannot live with one (module docstring)."""
        return 2 * limits.memory_bytes if self.limit_address_space else None

    def ran_out_of_memory(self, stderr: str) -> bool:
        text = stderr.lower()
        return any(marker in text for marker in self.memory_markers)


# -- linters -------------------------------------------------------------------------------------------


def _find_ruff() -> str | None:
    """ruff ships as a Python package whose binary sits next to the interpreter of the service's venv."""
    try:
        import ruff

        binary: str = ruff.find_ruff_bin()
        return os.path.realpath(binary)
    except (ImportError, FileNotFoundError, AttributeError):
        pass
    candidate = shutil.which("ruff") or shutil.which("ruff", path=os.path.dirname(sys.executable))
    return os.path.realpath(candidate) if candidate else None


def _parse_ruff(stdout: str) -> list[str]:
    """ruff's JSON output -> 'main.py:1:8: F401 `os` imported but unused'."""
    findings = []
    for item in _json_list(stdout):
        location = item.get("location") or {}
        name = os.path.basename(str(item.get("filename", "")))
        findings.append(
            f"{name}:{location.get('row')}:{location.get('column')}: {item.get('code')} {item.get('message')}"
        )
    return findings


def _parse_shellcheck(stdout: str) -> list[str]:
    """shellcheck's json1 output -> 'main.sh:2:6: warning SC2154 y is referenced but not assigned.'."""
    try:
        document = json.loads(stdout)
    except json.JSONDecodeError:
        raise LintOutputError(f"unreadable output: {stdout[:200]!r}") from None
    comments = document.get("comments") if isinstance(document, dict) else None
    if not isinstance(comments, list) or not all(isinstance(c, dict) for c in comments):
        raise LintOutputError(f"unexpected output: {stdout[:200]!r}")
    return [
        f"{os.path.basename(c.get('file', ''))}:{c.get('line')}:{c.get('column')}: "
        f"{c.get('level')} SC{c.get('code')} {c.get('message')}"
        for c in comments
    ]


def _json_list(stdout: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(stdout)
    except json.JSONDecodeError:
        raise LintOutputError(f"unreadable output: {stdout[:200]!r}") from None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise LintOutputError(f"unexpected output: {stdout[:200]!r}")
    return value


RUFF = Linter(
    tool="ruff",
    locate=_find_ruff,
    # --isolated: ignore any config file; the rules are pyflakes and pycodestyle errors (likely bugs),
    # not style, so a finding is worth the user's attention.
    args=("check", "--isolated", "--no-cache", "--output-format=json", "--target-version=py311", "--select=E4,E7,E9,F"),
    parse=_parse_ruff,
    install_hint="pip install ruff into Genesis's virtualenv (scripts/setup.sh installs it)",
    env={"RAYON_NUM_THREADS": "1"},  # ruff's threads count against the job's process limit
)

SHELLCHECK = Linter(
    tool="shellcheck",
    locate=lambda: shutil.which("shellcheck", path="/usr/bin:/bin"),
    args=("--shell=bash", "--format=json1"),
    parse=_parse_shellcheck,
    install_hint="apt-get install shellcheck",
)


# -- languages -----------------------------------------------------------------------------------------

# compile() only parses and compiles, it never executes; print just the SyntaxError, not our traceback.
# traceback (~10 ms of imports) is needed only to word a failure; -I -S: no site, which the check never uses.
_PYTHON_SYNTAX_CHECK = """\
import sys
path = sys.argv[1]
with open(path, "rb") as source:
    code = source.read()
try:
    compile(code, path, "exec", dont_inherit=True)
except (SyntaxError, ValueError) as exc:
    import traceback
    sys.stderr.write("".join(traceback.format_exception_only(type(exc), exc)))
    sys.exit(1)
"""

# Code.string_to_quoted!/2 parses without compiling or evaluating; print only the error, no stacktrace.
_ELIXIR_SYNTAX_CHECK = """\
try do
  Code.string_to_quoted!(File.read!("main.exs"), file: "main.exs")
rescue
  error ->
    IO.puts(:stderr, Exception.format(:error, error, []))
    System.halt(1)
end
"""


def _node_run(limits: Limits) -> tuple[str, ...]:
    """Cap V8's old space below RLIMIT_DATA, so a hog dies with V8's own clear "heap out of memory"."""
    heap_mb = max(16, limits.memory_bytes * 3 // 4 // MiB)
    return ("node", f"--max-old-space-size={heap_mb}", "main.js")


PYTHON = Toolchain(
    name=c.Language.PYTHON,
    syntax_argv=("python3", "-I", "-S", "-c", _PYTHON_SYNTAX_CHECK, "main.py"),
    run_argv=lambda _limits: ("python3", "-u", "main.py"),  # unbuffered: output survives a timeout kill
    memory_markers=("memoryerror", "cannot allocate memory"),
    limit_address_space=True,
    compiles_before_running=True,
    linter=RUFF,
    env={"PYTHONDONTWRITEBYTECODE": "1"},
)

JAVASCRIPT = Toolchain(
    name=c.Language.JAVASCRIPT,
    syntax_argv=("node", "--check", "main.js"),
    run_argv=_node_run,
    memory_markers=(
        "heap out of memory",
        "array buffer allocation failed",
        "fatal process out of memory",
        "cannot allocate memory",
    ),
    limit_address_space=False,
    compiles_before_running=True,
)

BASH = Toolchain(
    name=c.Language.BASH,
    syntax_argv=("bash", "-n", "main.sh"),
    run_argv=lambda _limits: ("bash", "main.sh"),
    memory_markers=("cannot allocate",),  # "bash: xmalloc: cannot allocate …", "…: Cannot allocate memory"
    limit_address_space=True,
    compiles_before_running=False,
    linter=SHELLCHECK,
)

ELIXIR = Toolchain(
    name=c.Language.ELIXIR,
    syntax_argv=("elixir", "-e", _ELIXIR_SYNTAX_CHECK),
    run_argv=lambda _limits: ("elixir", "main.exs"),
    memory_markers=("cannot allocate", "eheap_alloc", "erts_mmap", "out of memory"),
    limit_address_space=False,
    compiles_before_running=True,
    env={
        # One scheduler of each kind: the BEAM otherwise starts ~20 threads (more on big hosts), and
        # threads count against the job's process limit. CPU time is capped per process anyway.
        "ELIXIR_ERL_OPTIONS": "+S 1:1 +SDcpu 1:1 +SDio 1",
        "ERL_CRASH_DUMP_BYTES": "0",  # no erl_crash.dump filling the workdir after a crash
    },
)

# Keyed by the contract's enum, which is the list of languages (tests/test_contract.py checks all are here).
LANGUAGES: dict[c.Language, Toolchain] = {lang.name: lang for lang in (PYTHON, JAVASCRIPT, BASH, ELIXIR)}
_ALIASES: dict[str, c.Language] = {
    "py": c.Language.PYTHON,
    "python3": c.Language.PYTHON,
    "js": c.Language.JAVASCRIPT,
    "node": c.Language.JAVASCRIPT,
    "sh": c.Language.BASH,
}


def get_language(name: str) -> Toolchain:
    """The language called `name` (case-insensitive; a few common aliases accepted)."""
    key = name.strip().lower()
    try:
        return LANGUAGES[_ALIASES.get(key) or c.Language(key)]
    except (ValueError, KeyError):
        raise UnsupportedLanguage(name) from None
