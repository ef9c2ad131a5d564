"""Nexus LLM routing: config validation, the complexity classifier, the offline model and LlmRouter.

Nothing here may reach a network: real providers are replaced by the offline model and by litellm's own
`mock_response`, and the `no_network` fixture turns any connection attempt into a test failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import socket
import textwrap
import time

import pytest

from singularity_stack.contract import ChatMessage, Complexity
from singularity_stack.nexus import complexity as cx
from singularity_stack.nexus import offline_model as om
from singularity_stack.nexus.router import Completion, LlmRouter, NoModelAvailableError, RoutingError
from singularity_stack.nexus.routing_config import (
    RoutingConfigError,
    default_routing_config,
    load_routing_config,
    parse_routing_config,
)

# The router's litellm: importing it directly here would sort before the nexus imports, which are what set
# LITELLM_LOCAL_MODEL_COST_MAP first.
litellm = om.litellm


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    # litellm turns a refused connection into a provider error, which a fallback could then hide: every
    # attempt is also recorded, and the test fails if there was any.
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise ConnectionRefusedError(f"a nexus routing test tried to reach the network: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert attempts == [], "network access attempted"


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def run_program(source: str) -> str:
    code = compile(source, "<offline program>", "exec")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {"__name__": "__main__"})
    return out.getvalue()


# -- config --------------------------------------------------------------------------------------------

# A small config in the shape of the default one, with stand-ins for paid providers that never leave the
# process: litellm's `mock_response` answers (or fails, for "litellm.InternalServerError") without a request.
PAID_CONFIG = """
models:
  - model_name: paid
    litellm_params: {model: openai/fake-paid, api_key: os.environ/FAKE_PAID_KEY, mock_response: "paid answer"}
    model_info: {input_cost_per_token: 0.000001, output_cost_per_token: 0.000002}
    requires_env: [FAKE_PAID_KEY]
  - model_name: broken
    litellm_params: {model: openai/fake-broken, api_key: not-used, mock_response: litellm.InternalServerError}
  - model_name: offline
    litellm_params: {model: offline/deterministic}
    model_info: {input_cost_per_token: 0.0000001, output_cost_per_token: 0.0000002}
routes:
  default:
    simple: [paid, offline]
    medium: [broken, paid, offline]
    complex: [broken, offline]
  architect: {complex: [paid, offline]}
  only_paid: {simple: [paid], medium: [paid], complex: [paid]}
  offline_first: {simple: [offline, paid]}
router: {num_retries: 0, cooldown_time: 1, allowed_fails: 100, timeout: 10}
"""


def paid_config(**router_overrides):
    config = parse_routing_config(PAID_CONFIG, "PAID_CONFIG")
    return config.model_copy(update={"router": config.router.model_copy(update=router_overrides)})


def test_default_config_loads_and_every_route_ends_with_the_offline_model():
    config = load_routing_config(None)
    assert config is default_routing_config()
    names = {model.model_name for model in config.models}
    assert "offline" in names
    for task_type in [*config.routes, "some_unknown_task"]:
        for complexity in Complexity:
            chain = config.chain(task_type, complexity)
            assert chain[-1] == "offline", (task_type, complexity)
    # Real providers are gated by their keys; only the offline model needs nothing.
    for model in config.models:
        assert bool(model.required_env) == (model.model_name != "offline"), model.model_name
        assert model.provider_model.split("/")[0] in {"anthropic", "openai", "offline"}


def test_default_config_prices_the_offline_model_at_zero():
    offline = default_routing_config().model("offline")
    assert offline.provider_model == om.OFFLINE_MODEL
    assert offline.cost_per_token == {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0}


def test_load_from_a_file_and_refuse_a_missing_one(tmp_path):
    path = tmp_path / "routing.yaml"
    path.write_text(PAID_CONFIG)
    config = load_routing_config(path)
    assert [m.model_name for m in config.models] == ["paid", "broken", "offline"]
    assert config.router.num_retries == 0
    with pytest.raises(RoutingConfigError, match="cannot be read") as caught:
        load_routing_config(tmp_path / "missing.yaml")
    assert str(tmp_path / "missing.yaml") in str(caught.value)


def test_task_route_falls_back_to_default_route_per_complexity_and_task_types_are_normalized():
    config = parse_routing_config(PAID_CONFIG)
    assert config.chain("architect", Complexity.COMPLEX) == ("paid", "offline")
    assert config.chain("architect", Complexity.SIMPLE) == ("paid", "offline")  # from default
    assert config.chain("Offline-First ", Complexity.SIMPLE) == ("offline", "paid")
    assert config.chain("never_configured", Complexity.MEDIUM) == ("broken", "paid", "offline")


def test_env_references_count_as_required_env():
    config = parse_routing_config(
        """
        models:
          - model_name: m
            litellm_params: {model: openai/x, api_key: os.environ/KEY_A, api_base: os.environ/BASE_B}
            requires_env: [KEY_A, EXTRA_C]
        routes: {default: {simple: [m], medium: [m], complex: [m]}}
        """
    )
    assert config.model("m").required_env == ("KEY_A", "EXTRA_C", "BASE_B")
    assert config.model("m").cost_per_token is None


MINIMAL_MODELS = """
models:
  - model_name: a
    litellm_params: {model: offline/deterministic}
"""
MINIMAL_ROUTES = """
routes:
  default: {simple: [a], medium: [a], complex: [a]}
"""


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        pytest.param(
            MINIMAL_MODELS + MINIMAL_ROUTES + "  architect: {complex: [a, gpt-9]}\n",
            "routes.architect.complex[1]: unknown model 'gpt-9'",
            id="unknown-model",
        ),
        pytest.param(
            MINIMAL_MODELS + MINIMAL_ROUTES + "  architect: {huge: [a]}\n",
            "routes.architect: unknown complexity 'huge'; expected one of simple, medium, complex",
            id="unknown-complexity",
        ),
        pytest.param(
            MINIMAL_MODELS + "routes: {architect: {complex: [a]}}\n", "routes.default: required", id="no-default"
        ),
        pytest.param(
            MINIMAL_MODELS + "routes: {default: {simple: [a], complex: [a]}}\n",
            "routes.default.medium: required",
            id="default-incomplete",
        ),
        pytest.param(
            MINIMAL_MODELS + "routes: {default: {simple: [], medium: [a], complex: [a]}}\n",
            "routes.default.simple: Tuple should have at least 1 item",
            id="empty-chain",
        ),
        pytest.param(
            MINIMAL_MODELS + "routes: {default: {simple: [a, a], medium: [a], complex: [a]}}\n",
            "routes.default.simple: lists 'a' twice",
            id="repeated-model",
        ),
        pytest.param(
            "models: [{model_name: a, litellm_params: {api_key: x}}]\n" + MINIMAL_ROUTES,
            "models.0.litellm_params: needs 'model'",
            id="no-litellm-model",
        ),
        pytest.param(
            MINIMAL_MODELS + "  - model_name: a\n    litellm_params: {model: openai/x}\n" + MINIMAL_ROUTES,
            "models[1].model_name: 'a' is defined twice",
            id="duplicate-model",
        ),
        pytest.param(
            "models: [{model_name: a, litellm_params: {model: x/y}, model_info: {input_cost_per_token: -1}}]\n"
            + MINIMAL_ROUTES,
            "models.0.model_info: input_cost_per_token must be a number >= 0",
            id="negative-price",
        ),
        pytest.param(
            "models: [{model_name: a, litellm_params: {model: x/y}, model_info: {id: mine}}]\n" + MINIMAL_ROUTES,
            "models.0.model_info: 'id' is set by the router",
            id="own-id",
        ),
        pytest.param(
            "models: [{model_name: a, litellm_params: {model: x/y}, requires_env: [not a name]}]\n" + MINIMAL_ROUTES,
            "models.0.requires_env.0",
            id="bad-env-name",
        ),
        pytest.param(
            MINIMAL_MODELS + MINIMAL_ROUTES + "router: {num_retries: -1}\n",
            "router.num_retries: Input should be greater than or equal to 0",
            id="negative-retries",
        ),
        pytest.param(MINIMAL_MODELS + MINIMAL_ROUTES + "bogus: 1\n", "bogus: Extra inputs", id="unknown-key"),
        pytest.param(
            MINIMAL_MODELS + MINIMAL_ROUTES + "  Architect: {complex: [a]}\n", "routes.Architect", id="bad-task-type"
        ),
        pytest.param("models: [\n", "not valid YAML", id="bad-yaml"),
        pytest.param("- just a list\n", "expected a mapping", id="not-a-mapping"),
    ],
)
def test_invalid_configs_name_the_bad_field(yaml_text, expected):
    with pytest.raises(RoutingConfigError) as caught:
        parse_routing_config(yaml_text, "test.yaml")
    assert expected in caught.value.reason
    assert str(caught.value).startswith("invalid routing config test.yaml: ")


# -- complexity classifier -----------------------------------------------------------------------------

TIERS = {
    Complexity.COMPLEX: ["architect", "code_generation", "refactoring", "code_analysis", "qa", "pattern_analyzer"],
    Complexity.MEDIUM: ["coder", "planning", "decomposition", "pseudocode", "chat"],
    Complexity.SIMPLE: ["classifier", "parser", "simple_chat", "web_search"],
}
ARCHITECTURE_PROMPT = (
    "Design the architecture of a distributed, fault-tolerant job scheduler for our microservices. "
    "Cover security, scalability, concurrency control and the migration path from the current cron setup, "
    "and discuss the performance trade-offs of each option."
)


@pytest.mark.parametrize(
    ("task_type", "tier"), [(task, tier) for tier, tasks in TIERS.items() for task in tasks], ids=lambda v: str(v)
)
def test_known_task_types_keep_their_tier_whatever_the_prompt(task_type, tier):
    assert cx.classify_complexity(task_type, user("hi")) is tier
    assert cx.classify_complexity(task_type, user(ARCHITECTURE_PROMPT)) is tier
    assert cx.classify_complexity(task_type.upper().replace("_", "-"), user("hi")) is tier


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hi", Complexity.SIMPLE),
        ("What time zone is Berlin in?", Complexity.SIMPLE),
        ("Implement a function that parses ISO dates, and write unit tests for it please.", Complexity.MEDIUM),
        (ARCHITECTURE_PROMPT, Complexity.COMPLEX),
    ],
)
def test_unknown_task_types_are_scored_from_the_prompt(prompt, expected):
    assert cx.classify_complexity("brand_new_task", user(prompt)) is expected


def test_design_words_push_up_and_short_prompts_push_down():
    plain = "Please write something about the thing we talked about yesterday in the team meeting today"
    loaded = "Please write the security architecture for the distributed design we talked about in the meeting"
    assert len(plain.split()) == len(loaded.split())
    assert cx.score(loaded) > cx.score(plain)
    assert cx.score("design") < cx.score("design " + "word " * 30)
    # A repeated keyword counts once.
    assert cx.score("security " * 10) == cx.score("security " + "word " * 9)


def test_long_prompts_push_up():
    words = " ".join(["lorem"] * 500)
    assert cx.score(words) > cx.score(" ".join(["lorem"] * 50))
    assert cx.classify_complexity("unknown", user(words)) is Complexity.MEDIUM


def test_classifier_reads_user_messages_and_accepts_chat_messages():
    system = {"role": "system", "content": ARCHITECTURE_PROMPT}
    assert cx.classify_complexity("unknown", [system, {"role": "user", "content": "hi"}]) is Complexity.SIMPLE
    assert cx.classify_complexity("unknown", [system]) is Complexity.COMPLEX  # no user message: the rest counts
    as_models = [ChatMessage(role="user", content=ARCHITECTURE_PROMPT)]
    assert cx.classify_complexity("unknown", as_models) is cx.classify_complexity("unknown", user(ARCHITECTURE_PROMPT))
    parts = [{"role": "user", "content": [{"type": "text", "text": ARCHITECTURE_PROMPT}]}]
    assert cx.classify_complexity("unknown", parts) is Complexity.COMPLEX


# -- offline model -------------------------------------------------------------------------------------

NASTY_PROMPT = 'Write code: print("""hi""") ```python\nimport os``` \\ \'quotes\' and a very long tail ' + "x" * 200


@pytest.mark.parametrize("task_type", sorted(om.CODE_TASK_TYPES))
def test_offline_code_reply_has_one_runnable_python_block(task_type):
    messages = [{"role": "system", "content": "You are a coder."}, *user(NASTY_PROMPT)]
    text = om.offline_reply(task_type, messages)
    assert text == om.offline_reply(task_type, messages)
    assert text.startswith("[offline stand-in]")
    blocks = python_blocks(text)  # no language named: python
    assert len(blocks) == 1
    assert text.count("```") == 2
    assert om.prompt_digest(messages) in blocks[0]
    printed = run_program(blocks[0])
    assert printed == om.fallback_message(om.requested_task(messages)) + "\n"
    assert 'print("""hi""")' in printed


def test_offline_plain_reply_quotes_task_type_and_request_deterministically():
    messages = [*user("first question"), {"role": "assistant", "content": "ok"}, *user("Plan the Q3 roadmap\nnow")]
    text = om.offline_reply("planning", messages)
    assert text == om.offline_reply("planning", [dict(m) for m in messages])
    assert "'planning'" in text
    assert '"Plan the Q3 roadmap now"' in text
    assert "```" not in text
    assert "```" not in om.offline_reply("pseudocode", user("write pseudocode for a sort"))


def test_offline_digest_depends_on_the_prompt():
    assert om.prompt_digest(user("a")) != om.prompt_digest(user("b"))
    assert om.prompt_digest(user("a")) == om.prompt_digest([ChatMessage(role="user", content="a")])
    assert len(om.prompt_digest(user("a"))) == om.DIGEST_LENGTH


async def test_offline_model_through_litellm_async_and_sync():
    om.register_offline_provider()
    om.register_offline_provider()  # idempotent
    assert sum(item["provider"] == om.OFFLINE_PROVIDER for item in litellm.custom_provider_map) == 1
    messages = user("write a tiny program")
    kwargs = {"model": om.OFFLINE_MODEL, "messages": messages, "metadata": {"task_type": "coder"}}
    async_response = await litellm.acompletion(**kwargs)
    sync_response = litellm.completion(**kwargs)
    for response in (async_response, sync_response):
        assert response.model == om.OFFLINE_MODEL
        assert response.system_fingerprint == om.OFFLINE_FINGERPRINT
        text = response.choices[0].message.content
        assert text == om.offline_reply("coder", messages)
        assert response.usage.prompt_tokens == 4
        assert response.usage.completion_tokens == len(text.split())
        cost = litellm.completion_cost(
            completion_response=response,
            model=om.OFFLINE_MODEL,
            custom_cost_per_token={"input_cost_per_token": 1e-7, "output_cost_per_token": 2e-7},
        )
        assert cost == pytest.approx(4 * 1e-7 + len(text.split()) * 2e-7)
    # Without metadata the reply is the plain one, for the default task type.
    plain = await litellm.acompletion(model=om.OFFLINE_MODEL, messages=messages)
    assert plain.choices[0].message.content == om.offline_reply(om.DEFAULT_TASK_TYPE, messages)


async def test_offline_model_fails_on_the_marker():
    with pytest.raises(om.OfflineModelError):
        om.offline_response("chat", user(f"please {om.FAIL_MARKER}"))
    om.register_offline_provider()
    with pytest.raises(litellm.ServiceUnavailableError, match="offline stand-in failed"):
        await litellm.acompletion(model=om.OFFLINE_MODEL, messages=user(f"x {om.FAIL_MARKER}"), num_retries=0)
    # Only the last user message counts: an earlier marker does not fail the call.
    om.offline_response("chat", [*user(om.FAIL_MARKER), *user("fine now")])


# -- router --------------------------------------------------------------------------------------------


async def test_without_keys_everything_goes_to_offline_at_no_cost():
    router = LlmRouter(default_routing_config(), env={})
    assert router.available_models == ("offline",)
    for task_type, tier in [
        ("architect", Complexity.COMPLEX),
        ("chat", Complexity.MEDIUM),
        ("parser", Complexity.SIMPLE),
    ]:
        prompt = user("Summarise the plan for the next release")
        completion = await router.complete(task_type, prompt)
        assert isinstance(completion, Completion)
        assert completion.model == "offline"
        assert completion.provider_model == om.OFFLINE_MODEL
        assert completion.complexity is tier
        assert completion.complexity_source == "classifier"
        assert completion.text == om.offline_reply(task_type, prompt)
        assert completion.prompt_tokens == 7
        assert completion.completion_tokens == len(completion.text.split())
        assert completion.cost_usd == 0  # the offline stand-in is free
        assert completion.latency_ms >= 0


async def test_code_task_through_the_router_yields_a_runnable_program():
    router = LlmRouter(default_routing_config(), env={})
    messages = [ChatMessage(role="user", content="Write fizzbuzz")]
    completion = await router.complete("code_generation", messages)
    (program,) = python_blocks(completion.text)
    assert om.prompt_digest(messages) in program
    assert run_program(program).splitlines()[-1] == "FizzBuzz"
    assert completion.cost_usd == 0
    again = await router.complete("code_generation", messages)
    assert again.text == completion.text


def test_default_config_routes_follow_the_keys_that_are_set():
    # Only route() is asked: nothing is called, so the fake keys never reach a provider.
    config = default_routing_config()
    anthropic = LlmRouter(config, env={"ANTHROPIC_API_KEY": "test-key"})
    assert anthropic.route("architect", Complexity.COMPLEX) == ("claude-opus", "claude-sonnet", "offline")
    assert anthropic.route("parser", Complexity.SIMPLE) == ("claude-haiku", "offline")
    both = LlmRouter(config, env={"ANTHROPIC_API_KEY": "a", "OPENAI_API_KEY": "o"})
    assert both.route("unknown", Complexity.COMPLEX) == ("claude-opus", "gpt", "claude-sonnet", "offline")
    empty_key = LlmRouter(config, env={"ANTHROPIC_API_KEY": "", "OPENAI_API_KEY": "o"})
    assert empty_key.route("unknown", Complexity.SIMPLE) == ("gpt-mini", "offline")


async def test_paid_primary_answers_when_its_key_is_set(monkeypatch):
    monkeypatch.setenv("FAKE_PAID_KEY", "test-key")
    router = LlmRouter(paid_config())  # env defaults to os.environ
    assert router.available_models == ("paid", "broken", "offline")
    completion = await router.complete("chat", user("hi"), complexity=Complexity.SIMPLE)
    assert completion.model == "paid"
    assert completion.provider_model == "openai/fake-paid"
    assert completion.text == "paid answer"
    assert completion.prompt_tokens > 0 and completion.completion_tokens > 0
    expected = completion.prompt_tokens * 1e-6 + completion.completion_tokens * 2e-6
    assert completion.cost_usd == pytest.approx(expected)


async def test_paid_model_is_skipped_without_its_key():
    router = LlmRouter(paid_config(), env={})
    assert router.available_models == ("broken", "offline")
    assert router.route("chat", Complexity.SIMPLE) == ("offline",)
    completion = await router.complete("chat", user("hi"), complexity=Complexity.SIMPLE)
    assert completion.model == "offline"


async def test_failing_primary_falls_back_in_order_and_reports_who_answered():
    router = LlmRouter(paid_config(), env={"FAKE_PAID_KEY": "k"})
    assert router.route("chat", Complexity.MEDIUM) == ("broken", "paid", "offline")
    completion = await router.complete("chat", user("hi"), complexity=Complexity.MEDIUM)
    assert completion.model == "paid"
    assert completion.text == "paid answer"
    # Both broken and paid out of the way: the offline model, third in line, answers.
    without_paid = LlmRouter(paid_config(), env={})
    completion = await without_paid.complete("chat", user("hi"), complexity=Complexity.MEDIUM)
    assert completion.model == "offline"


async def test_offline_primary_failing_falls_back_to_paid():
    router = LlmRouter(paid_config(), env={"FAKE_PAID_KEY": "k"})
    completion = await router.complete("offline_first", user(f"hi {om.FAIL_MARKER}"), complexity=Complexity.SIMPLE)
    assert completion.model == "paid"


async def test_every_model_failing_raises_routing_error():
    router = LlmRouter(paid_config(), env={})
    with pytest.raises(RoutingError) as caught:
        await router.complete("chat", user(f"hi {om.FAIL_MARKER}"), complexity=Complexity.COMPLEX)
    error = caught.value
    assert not isinstance(error, NoModelAvailableError)
    assert error.models == ("broken", "offline")
    assert error.complexity is Complexity.COMPLEX
    assert "'chat'" in error.message and "broken, offline" in error.message
    assert "offline stand-in failed" in str(error)


async def test_no_available_model_names_task_type_and_complexity():
    router = LlmRouter(paid_config(), env={})
    with pytest.raises(NoModelAvailableError) as caught:
        await router.complete("only_paid", user("hi"), complexity=Complexity.MEDIUM)
    assert "task_type 'only_paid'" in str(caught.value)
    assert "complexity 'medium'" in str(caught.value)
    assert isinstance(caught.value, RoutingError)


async def test_explicit_complexity_bypasses_the_classifier():
    router = LlmRouter(paid_config(), env={"FAKE_PAID_KEY": "k"})
    # architect is a complex-tier task: the classifier would route it to complex (paid first).
    classified = await router.complete("architect", user("hi"))
    assert (classified.complexity, classified.complexity_source, classified.model) == (
        Complexity.COMPLEX,
        "classifier",
        "paid",
    )
    requested = await router.complete("architect", user("hi"), complexity=Complexity.MEDIUM)
    assert (requested.complexity, requested.complexity_source, requested.model) == (
        Complexity.MEDIUM,
        "request",
        "paid",  # medium: broken fails, paid answers
    )


async def test_retries_a_flaky_model_before_falling_back(monkeypatch):
    class Flaky(litellm.CustomLLM):
        calls = 0

        async def acompletion(self, model, messages, **kwargs):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise om.CustomLLMError(status_code=503, message="flaky: first call fails")
            return om.offline_response("chat", messages)

    monkeypatch.setattr(
        litellm, "custom_provider_map", [*litellm.custom_provider_map, {"provider": "flaky", "custom_handler": Flaky()}]
    )
    config = parse_routing_config(
        textwrap.dedent(
            """
            models:
              - {model_name: flaky, litellm_params: {model: flaky/one}, model_info: {input_cost_per_token: 0.000001}}
              - {model_name: offline, litellm_params: {model: offline/deterministic}}
            routes: {default: {simple: [flaky, offline], medium: [flaky, offline], complex: [flaky, offline]}}
            router: {num_retries: 1}
            """
        )
    )
    completion = await LlmRouter(config, env={}).complete("chat", user("hi"), complexity=Complexity.SIMPLE)
    assert Flaky.calls == 2
    assert completion.model == "flaky"
    assert completion.cost_usd == pytest.approx(completion.prompt_tokens * 1e-6)


async def test_total_timeout_bounds_the_whole_request(monkeypatch):
    """The call is cancelled when total_timeout passes (how soon after is bench/'s to measure, not ours)."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    class Slow(litellm.CustomLLM):
        async def acompletion(self, model, messages, **kwargs):
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            raise AssertionError("the total timeout should have cancelled this call")

    monkeypatch.setattr(
        litellm, "custom_provider_map", [*litellm.custom_provider_map, {"provider": "slow", "custom_handler": Slow()}]
    )
    config = parse_routing_config(
        """
        models: [{model_name: slow, litellm_params: {model: slow/one}}]
        routes: {default: {simple: [slow], medium: [slow], complex: [slow]}}
        router: {num_retries: 0, total_timeout: 0.2}
        """
    )
    with pytest.raises(RoutingError, match=r"no answer within total_timeout 0\.2 s"):
        await LlmRouter(config, env={}).complete("chat", user("hi"))
    assert started.is_set() and cancelled.is_set()  # the provider call was under way, and was cancelled


def failing_provider(monkeypatch, name: str) -> list[float]:
    """Register a litellm provider `name` whose every call fails as a provider outage (503); returns the
    (monotonic) times it was called."""
    calls: list[float] = []

    class Down(litellm.CustomLLM):
        async def acompletion(self, model, messages, **kwargs):
            calls.append(time.monotonic())
            raise om.CustomLLMError(status_code=503, message=f"{name}: provider outage")

    monkeypatch.setattr(
        litellm, "custom_provider_map", [*litellm.custom_provider_map, {"provider": name, "custom_handler": Down()}]
    )
    return calls


def down_then_offline(name: str, cooldown_time: float) -> str:
    return textwrap.dedent(
        f"""
        models:
          - {{model_name: {name}, litellm_params: {{model: {name}/one}}}}
          - {{model_name: offline, litellm_params: {{model: offline/deterministic}}}}
        routes: {{default: {{simple: [{name}, offline], medium: [{name}, offline], complex: [{name}, offline]}}}}
        router: {{num_retries: 0, allowed_fails: 1, cooldown_time: {cooldown_time}}}
        """
    )


async def test_a_failing_model_is_cooled_down_and_the_route_goes_on_without_it(monkeypatch):
    calls = failing_provider(monkeypatch, "down")
    router = LlmRouter(parse_routing_config(down_then_offline("down", 3600)), env={})
    answered = [(await router.complete("chat", user(f"q{n}"), complexity=Complexity.SIMPLE)).model for n in range(6)]
    assert answered == ["offline"] * 6  # every request answered, by the fallback
    # allowed_fails 1: the second failure rests the model; the four requests after it never try it.
    assert len(calls) == 2


async def test_a_cooled_down_model_is_tried_again_once_its_cooldown_time_has_passed(monkeypatch):
    calls = failing_provider(monkeypatch, "resting")
    router = LlmRouter(parse_routing_config(down_then_offline("resting", 1)), env={})
    for n in range(3):
        await router.complete("chat", user(f"q{n}"), complexity=Complexity.SIMPLE)
    assert len(calls) == 2  # resting
    rested_at = calls[-1]
    while time.monotonic() < rested_at + 1.5:  # its cooldown_time passes
        await asyncio.sleep(0.1)
    completion = await router.complete("chat", user("again"), complexity=Complexity.SIMPLE)
    assert completion.model == "offline" and len(calls) == 3  # tried again (and failed over again)


async def test_a_bad_request_does_not_cool_a_model_down(monkeypatch):
    calls: list[int] = []

    class Picky(litellm.CustomLLM):
        async def acompletion(self, model, messages, **kwargs):
            calls.append(1)
            if "bad" in messages[-1]["content"]:
                raise om.CustomLLMError(status_code=400, message="picky: the prompt is malformed")
            return om.offline_response("chat", messages)

    monkeypatch.setattr(
        litellm, "custom_provider_map", [*litellm.custom_provider_map, {"provider": "picky", "custom_handler": Picky()}]
    )
    router = LlmRouter(parse_routing_config(down_then_offline("picky", 3600)), env={})
    for n in range(3):
        assert (await router.complete("chat", user(f"bad {n}"), complexity=Complexity.SIMPLE)).model == "offline"
    good = await router.complete("chat", user("good"), complexity=Complexity.SIMPLE)
    assert good.model == "picky" and len(calls) == 4  # the prompts' fault, not the model's: never rested
