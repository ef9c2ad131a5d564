"""The offline model writes a valid program in every language Genesis runs, for the task it is given.

The prompts below are the ones Singularity's workflow sends (singularity/workflow.py: its system message
names the language, the code step quotes the task, a fix step quotes the failing code); every program is
run through Genesis's real sandbox `JobRunner`, with its syntax check and linters (ruff, shellcheck).
tests/test_stack_e2e.py does the same through the whole stack.
"""

from __future__ import annotations

import pytest
from sandbox_support import LANGUAGES, require_language, require_tool

from singularity_stack.contract import Language
from singularity_stack.genesis.runner import JobRunner, JobStatus
from singularity_stack.genesis.sandbox import Limits
from singularity_stack.nexus import offline_model as om
from singularity_stack.singularity.code import extract_code

# BEAM start-up needs ~0.5 s; a sandboxed job gets a little more than that here.
LIMITS = Limits(wall_time_s=10, cpu_time_s=4)

# task description -> what its program prints
TASKS = {
    "Write a program that prints a friendly greeting": "Hello, world!\n",
    "Print FizzBuzz for the numbers one to fifteen": "".join(
        "FizzBuzz\n" if n % 15 == 0 else "Fizz\n" if n % 3 == 0 else "Buzz\n" if n % 5 == 0 else f"{n}\n"
        for n in range(1, 16)
    ),
    "Write a program that lists prime numbers": "2 3 5 7 11 13 17 19 23 29 31 37 41 43 47\n",
    "Print the Fibonacci sequence": "0 1 1 2 3 5 8 13 21 34\n",
    "Write a program that prints the alphabet": "abcdefghijklmnopqrstuvwxyz\n",
}
# Quotes, interpolation and substitution syntax of all four languages, and a line break to smuggle code in.
HOSTILE_TASK = "Sort `x`: 'single' \"double\" #{System.halt(3)} ${HOME} $(exit 3) \\ %s \u2028 exit(3); MESSAGE"


def workflow_messages(language: str, task: str) -> list[dict[str, str]]:
    """The code_generation request of singularity/workflow.py."""
    return [
        {"role": "system", "content": f"You are a careful software engineer. Language: {language}."},
        {
            "role": "user",
            "content": f"Write the complete {language} program for {Language(language).source_name}.\n"
            f"Task: {task}\nDesign:\n[offline stand-in] Deterministic answer for task_type 'architect'\n"
            "Answer with one fenced code block.",
        },
    ]


def fix_messages(language: str, code: str) -> list[dict[str, str]]:
    """The fix-round (coder) request of singularity/workflow.py."""
    return [
        {"role": "system", "content": f"You are a careful software engineer. Language: {language}."},
        {
            "role": "user",
            "content": f"This {language} code fails with syntax_error:\nline 1: boom\n\nCode:\n{code}\n"
            "Answer with the corrected program in one fenced code block.",
        },
    ]


def program_of(reply: str, language: str) -> str:
    assert reply.startswith("[offline stand-in]")
    assert reply.count("```") == 2
    assert f"```{language}\n" in reply
    code = extract_code(reply)
    assert code is not None
    return code


@pytest.fixture
def runner(sandbox_ready: None) -> JobRunner:
    return JobRunner(max_concurrent=4, limits=LIMITS)


def require_linters(language: str) -> None:
    require_language(language)
    if language == "bash":
        require_tool("shellcheck", "shellcheck")


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("task", sorted(TASKS))
async def test_offline_program_runs_clean_in_genesis_in_every_language(runner, language, task):
    require_linters(language)
    messages = workflow_messages(language, task)
    reply = om.offline_reply("code_generation", messages)
    assert reply == om.offline_reply("code_generation", [dict(m) for m in messages])  # deterministic
    code = program_of(reply, language)
    assert om.OFFLINE_MODEL in code and om.prompt_digest(messages) in code  # labelled, in a comment
    outcome = await runner.run(code, language)
    assert outcome.status is JobStatus.OK, outcome
    assert outcome.lint == []
    assert outcome.exit_code == 0
    assert outcome.stdout == TASKS[task]


@pytest.mark.parametrize("language", LANGUAGES)
async def test_an_unrecognised_or_hostile_task_still_gives_a_clean_program(runner, language):
    require_linters(language)
    code = program_of(om.offline_reply("code_generation", workflow_messages(language, HOSTILE_TASK)), language)
    outcome = await runner.run(code, language)
    assert outcome.status is JobStatus.OK, outcome
    assert outcome.lint == [] and outcome.exit_code == 0
    (line,) = outcome.stdout.splitlines()
    assert line == om.fallback_message(om.requested_task(workflow_messages(language, HOSTILE_TASK)))
    assert "#{System.halt(3)} ${HOME} $(exit 3)" in line  # printed literally, never interpolated or run


@pytest.mark.parametrize("language", LANGUAGES)
async def test_a_fix_round_answers_in_the_same_language_for_the_same_task(runner, language):
    require_linters(language)
    task = "Write a program that prints a friendly greeting"
    first = program_of(om.offline_reply("code_generation", workflow_messages(language, task)), language)
    fixed = program_of(om.offline_reply("coder", fix_messages(language, first)), language)
    assert om.requested_task(fix_messages(language, first)) == task
    outcome = await runner.run(fixed, language)
    assert outcome.status is JobStatus.OK, outcome
    assert outcome.lint == [] and outcome.stdout == TASKS[task]


def test_the_language_comes_from_the_prompt():
    for language in LANGUAGES:
        assert om.requested_language(workflow_messages(language, "print hi")) is Language(language)
        assert om.requested_language([{"role": "user", "content": f"Write {language} code"}]) is Language(language)
    assert om.requested_language([{"role": "system", "content": "Language: JS."}]) is Language.JAVASCRIPT
    assert om.requested_language([{"role": "user", "content": "a shell script, in Bash"}]) is Language.BASH
    # The system message's "Language:" wins over a language the task mentions; nothing named: python.
    mixed = workflow_messages("elixir", "port this python script")
    assert om.requested_language(mixed) is Language.ELIXIR
    assert om.requested_language([{"role": "user", "content": "write fizzbuzz"}]) is Language.PYTHON


def test_the_task_comes_from_the_prompt_with_a_humans_clarification():
    messages = workflow_messages("bash", "Improve it?\nClarification from a human: print hello")
    assert om.requested_task(messages) == "Improve it? print hello"
    code = program_of(om.offline_reply("code_generation", messages), "bash")
    assert "Hello, world!" in code
    assert om.requested_task([{"role": "user", "content": "just\nthis"}]) == "just this"
