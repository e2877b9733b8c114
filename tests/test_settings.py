"""Configuration: every key from TOML and from `SLUICE_*`, the SPEC defaults, the example
file, one-line errors naming the key, `config_path`, `resolve_providers`, and the exit
code of `sluice serve` on a bad config."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import certifi
import pytest
from pydantic import BaseModel, SecretStr

from proxy.admission import Policy
from proxy.errors import ConfigError
from proxy.settings import (
    AdmissionSection,
    AdmissionSettings,
    ClientSettings,
    ClusterSettings,
    ProviderSettings,
    ServerSettings,
    Settings,
    config_path,
    load,
    resolve_clients,
    resolve_providers,
    secrets,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = PROJECT_ROOT / "config.example.toml"

PROVIDER_TOML = '[[providers]]\nid = "umans"\nbase_url = "https://api.umans.ai/v1"\n'
SECOND_PROVIDER_TOML = '[[providers]]\nid = "openai"\nbase_url = "https://api.openai.com/v1"\n'

SECTIONS: dict[str, type[BaseModel]] = {
    "server": ServerSettings,
    "admission": AdmissionSection,
    "cluster": ClusterSettings,
}

# SPEC section 2, written out rather than read from the models: a changed default
# must be a deliberate change of both.
SPEC_DEFAULTS: dict[str, dict[str, Any]] = {
    "server": {
        "host": "127.0.0.1",
        "port": 8080,
        "admin_token": "",
        "database": "sluice.db",
        "log_format": "console",
        "log_level": "info",
        "shutdown_grace_s": 30,
        "max_body_bytes": 33_554_432,
        "upstream_connect_timeout_s": 10,
        "upstream_read_timeout_s": 600,
        "ca_bundle": "",
        # SPEC section 11
        "allow_open_admin": False,
        "max_header_bytes": 65_536,
        "max_headers": 100,
        "client_header_timeout_s": 10,
        "client_body_timeout_s": 60,
        "max_connections": 10_000,
        "max_queued_body_bytes": 1_073_741_824,
    },
    "admission": {
        "cooldown_ms": 350,
        "slot_timeout_s": 300,
        "watchdog_interval_s": 30,
        "pause_s": 30,
        "usage_poll_interval_ms": 1000,
        "queue_timeout_s": 600,
        "max_queue": 10_000,
        "retry_on_429": 2,
        "admitted_paths": ["/chat/completions", "/completions", "/responses", "/messages"],
        "derive_prompt_start": True,
        "reduce_on_429": "always",
        "reduce_on_429_match": "",
        "restore_after_s": 0,
        "queued_keepalive_s": 0,
        "prompt_memory_s": 86_400,
    },
    "cluster": {"redis_url": "", "lease_s": 15, "instance_id": ""},
}
PROVIDER_DEFAULTS: dict[str, Any] = {
    "api_key": None,
    "api_key_env": None,
    "auth_header": "authorization",
    "limit": None,
    "usage_gate": False,
    "default": False,
    "read_timeout_s": None,
    "connect_timeout_s": None,
    "cooldown_ms": None,
    "slot_timeout_s": None,
    "watchdog_interval_s": None,
    "pause_s": None,
    "usage_poll_interval_ms": None,
    "queue_timeout_s": None,
    "max_queue": None,
    "retry_on_429": None,
    "admitted_paths": None,
    "derive_prompt_start": None,
    "reduce_on_429": None,
    "reduce_on_429_match": None,
    "restore_after_s": None,
    "queued_keepalive_s": None,
}

# Every key set to a value that is not its default.
NON_DEFAULT: dict[str, dict[str, Any]] = {
    "server": {
        "host": "0.0.0.0",
        "port": 9001,
        "admin_token": "admin-s3cret",
        "database": "state/other.db",
        "log_format": "json",
        "log_level": "debug",
        "shutdown_grace_s": 5.5,
        "max_body_bytes": 1024,
        "upstream_connect_timeout_s": 2.5,
        "upstream_read_timeout_s": 90.5,
        "ca_bundle": certifi.where(),  # a real PEM bundle: the file is checked at load
        "allow_open_admin": True,
        "max_header_bytes": 8192,
        "max_headers": 20,
        "client_header_timeout_s": 2.5,
        "client_body_timeout_s": 7.5,
        "max_connections": 64,
        "max_queued_body_bytes": 1_000_000,
    },
    "admission": {
        "cooldown_ms": 500,
        "slot_timeout_s": 120.5,
        "watchdog_interval_s": 7.5,
        "pause_s": 12.5,
        "usage_poll_interval_ms": 250,
        "queue_timeout_s": 45.5,
        "max_queue": 50,
        "retry_on_429": 5,
        "admitted_paths": ["/chat/completions", "/embeddings"],
        "derive_prompt_start": False,
        "reduce_on_429": "never",  # "match" needs a pattern: set alone it is an error
        "reduce_on_429_match": "concurren(t|cy)",
        "restore_after_s": 300.5,
        "queued_keepalive_s": 15.5,
        "prompt_memory_s": 3600.5,
    },
    "cluster": {
        "redis_url": "redis://localhost:6379/0",
        "lease_s": 20.5,
        "instance_id": "replica-a",
    },
}
NON_DEFAULT_PROVIDER: dict[str, Any] = {
    "id": "other",
    "base_url": "https://llm.example.com/api/v1",
    "api_key_env": "OTHER_API_KEY",
    "auth_header": "x-api-key",
    "limit": 4,
    "usage_gate": True,
    "default": True,
    "read_timeout_s": 33.5,
    "connect_timeout_s": 3.5,
    "cooldown_ms": 0,  # 0 is a real override, not "unset"
    "slot_timeout_s": 60.5,
    "watchdog_interval_s": 5.5,
    "pause_s": 0,
    "usage_poll_interval_ms": 100,
    "queue_timeout_s": 15.5,
    "max_queue": 0,
    "retry_on_429": 0,
    "admitted_paths": ["/responses"],
    "derive_prompt_start": False,
    "reduce_on_429": "never",
    "reduce_on_429_match": "^x-ratelimit-scope: concurrent$",
    "restore_after_s": 0,
    "queued_keepalive_s": 2.5,
}
# `api_key` excludes `api_key_env`, so it gets a provider of its own.
KEYED_PROVIDER: dict[str, Any] = {
    "id": "keyed",
    "base_url": "http://127.0.0.1:9999/v1",
    "api_key": "sk-literal-key",
}

# `[[clients]]` (SPEC section 11): `key_sha256` excludes `key_env`, so two entries.
CLIENT_KEY = "client-key-a"
CLIENT_DIGEST = hashlib.sha256(CLIENT_KEY.encode()).hexdigest()
CLIENT_DEFAULTS: dict[str, Any] = {"key_sha256": None, "key_env": None, "max_in_flight": {}}
NON_DEFAULT_CLIENT: dict[str, Any] = {
    "id": "team-a",
    "key_sha256": CLIENT_DIGEST,
    "max_in_flight": {"other": 2, "keyed": 1},
}
ENV_KEYED_CLIENT: dict[str, Any] = {"id": "team-b", "key_env": "TEAM_B_KEY"}
CLIENT_TOML = f'[[clients]]\nid = "team-a"\nkey_sha256 = "{CLIENT_DIGEST}"\n'


@pytest.fixture(autouse=True)
def _no_sluice_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `SLUICE_*` variable from the caller's shell must not leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("SLUICE_"):
            monkeypatch.delenv(name)


def toml_value(value: Any) -> str:
    """JSON spells strings, numbers, booleans and string lists as TOML does; a table
    is written inline."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def toml_table(header: str, values: dict[str, Any]) -> str:
    return header + "\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())


def provider_table(provider_id: str = "umans", base_url: str = "https://x.example/v1") -> str:
    """A `[[providers]]` table with only the keys it must have."""
    return toml_table("[[providers]]", {"id": provider_id, "base_url": base_url})


def plain(value: Any) -> Any:
    """A settings value as the plain TOML value it was written from."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


def write(tmp_path: Path, text: str, name: str = "sluice.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str) -> Settings:
    return load(write(tmp_path, text))


@contextlib.contextmanager
def one_line_error(*names: str) -> Iterator[None]:
    """The block raises a ConfigError with the contract of every config error: one
    line, the prefix, the key it is about."""
    with pytest.raises(ConfigError) as caught:
        yield
    message = str(caught.value)
    assert "\n" not in message, repr(message)
    assert "\r" not in message, repr(message)
    assert message.startswith("config error:"), message
    for name in names:
        assert name in message, message


# --- every key, from TOML and from the environment ---------------------------------


def test_the_tables_below_cover_every_key() -> None:
    """A new key must be added to the SPEC defaults and the round trips here."""
    for section, model in SECTIONS.items():
        assert set(SPEC_DEFAULTS[section]) == set(model.model_fields), section
        assert set(NON_DEFAULT[section]) == set(model.model_fields), section
        for key, value in NON_DEFAULT[section].items():
            assert value != SPEC_DEFAULTS[section][key], f"{section}.{key}"
    provider_keys = set(ProviderSettings.model_fields)
    assert set(PROVIDER_DEFAULTS) == provider_keys - {"id", "base_url"}
    assert set(NON_DEFAULT_PROVIDER) | set(KEYED_PROVIDER) == provider_keys
    client_keys = set(ClientSettings.model_fields)
    assert set(CLIENT_DEFAULTS) == client_keys - {"id"}
    assert set(NON_DEFAULT_CLIENT) | set(ENV_KEYED_CLIENT) == client_keys


def test_every_key_round_trips_from_toml(tmp_path: Path) -> None:
    text = "".join(toml_table(f"[{s}]", NON_DEFAULT[s]) for s in SECTIONS)
    text += toml_table("[[providers]]", NON_DEFAULT_PROVIDER)
    text += toml_table("[[providers]]", KEYED_PROVIDER)
    text += toml_table("[[clients]]", NON_DEFAULT_CLIENT)
    text += toml_table("[[clients]]", ENV_KEYED_CLIENT)
    settings = load_text(tmp_path, text)

    team_a, team_b = settings.clients
    for key, expected in NON_DEFAULT_CLIENT.items():
        assert getattr(team_a, key) == expected, f"clients[0].{key}"
    for key, expected in ENV_KEYED_CLIENT.items():
        assert getattr(team_b, key) == expected, f"clients[1].{key}"
    for section, values in NON_DEFAULT.items():
        for key, expected in values.items():
            assert plain(getattr(getattr(settings, section), key)) == expected, f"{section}.{key}"
    other, keyed = settings.providers
    for key, expected in NON_DEFAULT_PROVIDER.items():
        assert plain(getattr(other, key)) == expected, f"providers[0].{key}"
    for key, expected in KEYED_PROVIDER.items():
        assert plain(getattr(keyed, key)) == expected, f"providers[1].{key}"


def env_text(value: Any) -> str:
    """How a user writes `value` in an environment variable."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


ENV_CASES = [
    pytest.param(
        f"SLUICE_{section.upper()}__{key.upper()}", section, key, value, id=f"{section}.{key}"
    )
    for section, values in NON_DEFAULT.items()
    for key, value in values.items()
] + [
    pytest.param(
        f"SLUICE_PROVIDERS__0__{key.upper()}", "providers", key, value, id=f"providers.{key}"
    )
    for key, value in {**NON_DEFAULT_PROVIDER, "api_key": KEYED_PROVIDER["api_key"]}.items()
]


@pytest.mark.parametrize(("env_name", "section", "key", "value"), ENV_CASES)
def test_every_key_from_the_environment_overrides_toml(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env_name: str,
    section: str,
    key: str,
    value: Any,
) -> None:
    # The file sets every section key to its default, so the environment must win
    # over an explicit TOML value, not merely fill a gap.
    text = "".join(toml_table(f"[{s}]", SPEC_DEFAULTS[s]) for s in SECTIONS) + PROVIDER_TOML
    monkeypatch.setenv(env_name, env_text(value))
    settings = load_text(tmp_path, text)
    owner = settings.providers[0] if section == "providers" else getattr(settings, section)
    assert plain(getattr(owner, key)) == value


def test_environment_keys_named_in_the_spec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICE_SERVER__PORT", "9000")
    monkeypatch.setenv("SLUICE_ADMISSION__COOLDOWN_MS", "500")
    monkeypatch.setenv("SLUICE_ADMISSION__ADMITTED_PATHS", '["/x"]')
    monkeypatch.setenv("SLUICE_PROVIDERS__0__LIMIT", "3")
    monkeypatch.setenv("SLUICE_CLUSTER__REDIS_URL", "redis://cache:6379/1")
    settings = load_text(tmp_path, "[server]\nport = 8081\n" + PROVIDER_TOML + "limit = 9\n")
    assert settings.server.port == 9000
    assert settings.server.host == "127.0.0.1"  # the rest of [server] is untouched
    assert settings.admission.cooldown_ms == 500
    assert settings.admission.admitted_paths == ("/x",)
    assert settings.providers[0].limit == 3
    assert settings.providers[0].id == "umans"
    assert settings.cluster.redis_url == "redis://cache:6379/1"


def test_lower_case_environment_names_work_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("sluice_server__port", "9002")
    assert load_text(tmp_path, PROVIDER_TOML).server.port == 9002


def test_providers_as_json_replace_the_file_and_take_indexed_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    providers = [
        {"id": "a", "base_url": "https://a.example/v1", "limit": 2},
        {"id": "b", "base_url": "https://b.example/v1", "default": True},
    ]
    monkeypatch.setenv("SLUICE_PROVIDERS", json.dumps(providers))
    # Applied after the JSON although both name the same list.
    monkeypatch.setenv("SLUICE_PROVIDERS__1__LIMIT", "7")
    settings = load_text(tmp_path, PROVIDER_TOML)
    assert [(p.id, p.limit, p.default) for p in settings.providers] == [
        ("a", 2, False),
        ("b", 7, True),
    ]


def test_providers_from_the_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_PROVIDERS", '[{"id": "solo", "base_url": "http://127.0.0.1:1/v1"}]')
    settings = load(None)
    assert [p.id for p in settings.providers] == ["solo"]
    assert settings.server.port == 8080


# --- defaults -----------------------------------------------------------------------


def test_defaults_are_the_spec_values(tmp_path: Path) -> None:
    settings = load_text(tmp_path, PROVIDER_TOML)
    # [admission] keys are overrides; their defaults are the resolved policy's.
    (resolved,) = resolve_providers(settings)
    for section, values in SPEC_DEFAULTS.items():
        for key, expected in values.items():
            policy_key = section == "admission" and key in AdmissionSettings.model_fields
            holder = resolved.policy if policy_key else getattr(settings, section)
            assert plain(getattr(holder, key)) == expected, f"{section}.{key}"
    for key, expected in PROVIDER_DEFAULTS.items():
        assert getattr(settings.providers[0], key) == expected, f"providers[0].{key}"
    assert settings.clients == ()
    (client,) = load_text(tmp_path, PROVIDER_TOML + CLIENT_TOML).clients
    for key, expected in CLIENT_DEFAULTS.items():
        if key != "key_sha256":
            assert getattr(client, key) == expected, f"clients[0].{key}"


# --- config.example.toml ------------------------------------------------------------


def example_sections() -> dict[str, str]:
    """The example's text per table: server, admission, providers (all entries), cluster."""
    sections: dict[str, str] = {}
    current = ""
    for line in EXAMPLE.read_text().splitlines():
        # A table may be shown commented out (`# [[clients]]`): it changes behaviour.
        header = re.fullmatch(r"(?:#\s*)?\[\[?(\w+)\]\]?\s*(#.*)?", line.strip())
        if header:
            current = header.group(1)
        sections[current] = sections.get(current, "") + line + "\n"
    return sections


EXAMPLE_MODELS: dict[str, type[BaseModel]] = {
    **SECTIONS,
    "providers": ProviderSettings,
    "clients": ClientSettings,
}


@pytest.mark.parametrize("section", list(EXAMPLE_MODELS))
def test_example_documents_every_key(section: str) -> None:
    """Each key appears in its own table, set or commented out, with a comment of its own."""
    text = example_sections()[section]
    for key in EXAMPLE_MODELS[section].model_fields:
        lines = re.findall(rf"^\s*#?\s*{key}\s*=.*$", text, flags=re.MULTILINE)
        assert lines, f"config.example.toml does not document {section}.{key}"
        assert any("#" in line.lstrip("# ").split("=", 1)[1] for line in lines), (
            f"{section}.{key} has no comment: {lines}"
        )


def test_example_loads_and_shows_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UMANS_API_KEY", "sk-example")
    settings = load(EXAMPLE)
    tomllib.loads(EXAMPLE.read_text())  # plain TOML, no sluice-specific syntax
    for section, model in SECTIONS.items():
        if section == "admission":  # overrides: the example spells out the defaults
            shown = dataclasses.replace(Policy(), **settings.admission.overrides())
            assert shown == Policy(), section
        else:
            assert getattr(settings, section) == model(), section
    umans, openai = settings.providers
    assert (umans.id, umans.api_key_env, umans.limit, umans.usage_gate, umans.default) == (
        "umans",
        "UMANS_API_KEY",
        4,
        True,
        True,
    )
    assert (openai.id, openai.limit, openai.default) == ("openai", None, False)
    resolved = resolve_providers(settings)
    assert [p.api_key for p in resolved] == ["sk-example", None]


def test_example_mentions_environment_overrides() -> None:
    text = EXAMPLE.read_text()
    for example in (
        "SLUICE_SERVER__PORT=9000",
        "SLUICE_PROVIDERS__0__LIMIT=3",
        "SLUICE_PROVIDERS='[",
    ):
        assert example in text


# --- errors: one line, naming the key ------------------------------------------------

ERROR_CASES = [
    # unknown keys, in every table and at the top
    pytest.param("[server]\nprot = 1\n" + PROVIDER_TOML, {}, "server.prot", id="unknown-server"),
    pytest.param(
        "[admission]\ncooldown = 1\n" + PROVIDER_TOML,
        {},
        "admission.cooldown",
        id="unknown-admission",
    ),
    pytest.param(
        "[cluster]\nredis = 'x'\n" + PROVIDER_TOML, {}, "cluster.redis", id="unknown-cluster"
    ),
    pytest.param(PROVIDER_TOML + "limt = 3\n", {}, "providers[0].limt", id="unknown-provider"),
    pytest.param("[sever]\nport = 1\n" + PROVIDER_TOML, {}, "sever", id="unknown-table"),
    pytest.param("debug = true\n" + PROVIDER_TOML, {}, "debug", id="unknown-top-level"),
    # unknown SLUICE_* variables
    pytest.param(
        PROVIDER_TOML, {"SLUICE_SERVER__PROT": "1"}, "server.prot", id="env-unknown-server"
    ),
    pytest.param(
        PROVIDER_TOML, {"SLUICE_ADMISION__COOLDOWN_MS": "1"}, "admision", id="env-unknown-table"
    ),
    pytest.param(
        PROVIDER_TOML,
        {"SLUICE_PROVIDERS__0__LIMT": "1"},
        "providers[0].limt",
        id="env-unknown-provider",
    ),
    pytest.param(PROVIDER_TOML, {"SLUICE_DEBUG": "1"}, "debug", id="env-unknown-top-level"),
    pytest.param(
        PROVIDER_TOML,
        {"SLUICE_PROVIDERS__3__LIMIT": "1"},
        "SLUICE_PROVIDERS__3__LIMIT",
        id="env-no-such-provider",
    ),
    pytest.param(
        "[server]\nport = 1\n" + PROVIDER_TOML,
        {"SLUICE_SERVER__PORT__X": "1"},
        "SLUICE_SERVER__PORT__X",
        id="env-below-a-toml-value",
    ),
    pytest.param(
        PROVIDER_TOML,
        {"SLUICE_SERVER__PORT__X": "1"},
        "server.port",
        id="env-below-a-default-value",
    ),
    # wrong types
    pytest.param(
        "[server]\nport = 'abc'\n" + PROVIDER_TOML, {}, "server.port", id="string-for-int"
    ),
    pytest.param("[server]\nport = true\n" + PROVIDER_TOML, {}, "server.port", id="bool-for-port"),
    pytest.param(PROVIDER_TOML + "limit = true\n", {}, "providers[0].limit", id="bool-for-limit"),
    pytest.param(PROVIDER_TOML + "limit = 2.5\n", {}, "providers[0].limit", id="float-for-limit"),
    pytest.param(
        "[admission]\ncooldown_ms = 2.5\n" + PROVIDER_TOML,
        {},
        "admission.cooldown_ms",
        id="float-for-cooldown",
    ),
    pytest.param(
        "[admission]\nmax_queue = false\n" + PROVIDER_TOML,
        {},
        "admission.max_queue",
        id="bool-for-max-queue",
    ),
    pytest.param(
        "[admission]\npause_s = true\n" + PROVIDER_TOML,
        {},
        "admission.pause_s",
        id="bool-for-seconds",
    ),
    pytest.param(
        "[cluster]\nlease_s = 'soon'\n" + PROVIDER_TOML,
        {},
        "cluster.lease_s",
        id="string-for-seconds",
    ),
    pytest.param("[server]\nhost = 5\n" + PROVIDER_TOML, {}, "server.host", id="int-for-string"),
    pytest.param(
        "[server]\nlog_format = 'xml'\n" + PROVIDER_TOML,
        {},
        "server.log_format",
        id="bad-log-format",
    ),
    pytest.param(
        "[server]\nlog_level = 'loud'\n" + PROVIDER_TOML, {}, "server.log_level", id="bad-log-level"
    ),
    pytest.param(
        PROVIDER_TOML + "usage_gate = 'maybe'\n", {}, "providers[0].usage_gate", id="bad-bool"
    ),
    pytest.param(
        "[admission]\nadmitted_paths = '/x'\n" + PROVIDER_TOML,
        {},
        "admission.admitted_paths",
        id="string-for-list",
    ),
    pytest.param(
        "[admission]\nadmitted_paths = ['x']\n" + PROVIDER_TOML,
        {},
        "admission.admitted_paths",
        id="relative-path",
    ),
    pytest.param("server = 1\n" + PROVIDER_TOML, {}, "server", id="value-for-table"),
    pytest.param("[providers]\nid = 'a'\n", {}, "providers", id="table-for-list"),
    pytest.param(
        PROVIDER_TOML, {"SLUICE_SERVER__PORT": "abc"}, "server.port", id="env-string-for-int"
    ),
    pytest.param(
        PROVIDER_TOML,
        {"SLUICE_PROVIDERS__0__LIMIT": "true"},
        "providers[0].limit",
        id="env-bool-for-limit",
    ),
    pytest.param(
        PROVIDER_TOML,
        {"SLUICE_PROVIDERS__0__LIMIT": "2.5"},
        "providers[0].limit",
        id="env-float-for-limit",
    ),
    pytest.param(
        PROVIDER_TOML,
        {"SLUICE_ADMISSION__ADMITTED_PATHS": "[1, 2]"},
        "admission.admitted_paths",
        id="env-bad-list",
    ),
    # out of range
    pytest.param("[server]\nport = -1\n" + PROVIDER_TOML, {}, "server.port", id="negative-port"),
    pytest.param("[server]\nport = 65536\n" + PROVIDER_TOML, {}, "server.port", id="port-too-big"),
    pytest.param(
        "[server]\nmax_body_bytes = 0\n" + PROVIDER_TOML,
        {},
        "server.max_body_bytes",
        id="zero-body",
    ),
    pytest.param(
        "[server]\nshutdown_grace_s = -1\n" + PROVIDER_TOML,
        {},
        "server.shutdown_grace_s",
        id="negative-grace",
    ),
    pytest.param(
        "[server]\nupstream_read_timeout_s = 0\n" + PROVIDER_TOML,
        {},
        "server.upstream_read_timeout_s",
        id="zero-read-timeout",
    ),
    pytest.param(
        "[admission]\ncooldown_ms = -1\n" + PROVIDER_TOML,
        {},
        "admission.cooldown_ms",
        id="negative-cooldown",
    ),
    pytest.param(
        "[admission]\ncooldown_ms = 3600001\n" + PROVIDER_TOML,
        {},
        "admission.cooldown_ms",
        id="cooldown-too-big",
    ),
    pytest.param(
        "[admission]\nslot_timeout_s = 0\n" + PROVIDER_TOML,
        {},
        "admission.slot_timeout_s",
        id="zero-slot-timeout",
    ),
    pytest.param(
        "[admission]\npause_s = -0.5\n" + PROVIDER_TOML,
        {},
        "admission.pause_s",
        id="negative-pause",
    ),
    pytest.param(
        "[admission]\npause_s = nan\n" + PROVIDER_TOML, {}, "admission.pause_s", id="nan-pause"
    ),
    pytest.param(
        "[admission]\nmax_queue = -1\n" + PROVIDER_TOML,
        {},
        "admission.max_queue",
        id="negative-max-queue",
    ),
    pytest.param(
        "[admission]\nretry_on_429 = -1\n" + PROVIDER_TOML,
        {},
        "admission.retry_on_429",
        id="negative-retries",
    ),
    pytest.param(
        "[admission]\nqueued_keepalive_s = 0.01\n" + PROVIDER_TOML,
        {},
        "admission.queued_keepalive_s",
        id="keepalive-too-often",
    ),
    pytest.param(
        PROVIDER_TOML + "queued_keepalive_s = -1\n",
        {},
        "providers[0].queued_keepalive_s",
        id="negative-keepalive",
    ),
    pytest.param(
        "[admission]\nusage_poll_interval_ms = 0\n" + PROVIDER_TOML,
        {},
        "admission.usage_poll_interval_ms",
        id="zero-poll",
    ),
    pytest.param(
        "[admission]\nreduce_on_429 = 'sometimes'\n" + PROVIDER_TOML,
        {},
        "admission.reduce_on_429",
        id="unknown-reduce-rule",
    ),
    pytest.param(
        "[admission]\nreduce_on_429_match = 'concurren(t'\n" + PROVIDER_TOML,
        {},
        "admission.reduce_on_429_match",
        id="bad-regex",
    ),
    pytest.param(
        "[admission]\nrestore_after_s = -1\n" + PROVIDER_TOML,
        {},
        "admission.restore_after_s",
        id="negative-restore",
    ),
    pytest.param(
        "[cluster]\nlease_s = 0\n" + PROVIDER_TOML, {}, "cluster.lease_s", id="zero-lease"
    ),
    pytest.param(PROVIDER_TOML + "limit = 0\n", {}, "providers[0].limit", id="limit-0"),
    pytest.param(PROVIDER_TOML + "limit = 10001\n", {}, "providers[0].limit", id="limit-10001"),
    pytest.param(PROVIDER_TOML + "limit = -4\n", {}, "providers[0].limit", id="negative-limit"),
    pytest.param(
        PROVIDER_TOML + "cooldown_ms = -1\n",
        {},
        "providers[0].cooldown_ms",
        id="provider-negative-cooldown",
    ),
    pytest.param(
        PROVIDER_TOML + "read_timeout_s = 0\n",
        {},
        "providers[0].read_timeout_s",
        id="provider-zero-read-timeout",
    ),
    pytest.param(
        PROVIDER_TOML + "connect_timeout_s = -1\n",
        {},
        "providers[0].connect_timeout_s",
        id="provider-negative-connect-timeout",
    ),
    pytest.param(
        PROVIDER_TOML + "max_queue = -1\n",
        {},
        "providers[0].max_queue",
        id="provider-negative-max-queue",
    ),
    pytest.param(
        PROVIDER_TOML, {"SLUICE_PROVIDERS__0__LIMIT": "0"}, "providers[0].limit", id="env-limit-0"
    ),
    # providers
    pytest.param("", {}, "providers", id="no-providers"),
    pytest.param("providers = []\n", {}, "providers", id="empty-providers"),
    pytest.param("[[providers]]\nid = 'umans'\n", {}, "providers[0].base_url", id="no-base-url"),
    pytest.param(
        "[[providers]]\nbase_url = 'https://x.example'\n", {}, "providers[0].id", id="no-id"
    ),
    pytest.param(
        PROVIDER_TOML + "api_key = 'k'\napi_key_env = 'K'\n",
        {},
        "providers[0].api_key",
        id="two-keys",
    ),
    pytest.param(PROVIDER_TOML + PROVIDER_TOML, {}, "providers[1].id", id="duplicate-id"),
    pytest.param(
        PROVIDER_TOML + "default = true\n" + SECOND_PROVIDER_TOML + "default = true\n",
        {},
        "providers",
        id="two-defaults",
    ),
    # clients
    pytest.param(
        PROVIDER_TOML + CLIENT_TOML + "keys = 1\n", {}, "clients[0].keys", id="unknown-client-key"
    ),
    pytest.param(
        PROVIDER_TOML + "[[clients]]\nid = 'a'\n", {}, "clients[0].key_sha256", id="no-client-key"
    ),
    pytest.param(
        PROVIDER_TOML + CLIENT_TOML + "key_env = 'K'\n",
        {},
        "clients[0].key_sha256",
        id="two-client-keys",
    ),
    pytest.param(
        PROVIDER_TOML + "[[clients]]\nid = 'a'\nkey_sha256 = 'abc'\n",
        {},
        "clients[0].key_sha256",
        id="short-digest",
    ),
    pytest.param(
        PROVIDER_TOML + f"[[clients]]\nid = 'a'\nkey_sha256 = '{'g' * 64}'\n",
        {},
        "clients[0].key_sha256",
        id="non-hex-digest",
    ),
    pytest.param(
        PROVIDER_TOML + f"[[clients]]\nid = 'A'\nkey_sha256 = '{CLIENT_DIGEST}'\n",
        {},
        "clients[0].id",
        id="bad-client-id",
    ),
    pytest.param(
        PROVIDER_TOML + f"[[clients]]\nkey_sha256 = '{CLIENT_DIGEST}'\n",
        {},
        "clients[0].id",
        id="no-client-id",
    ),
    pytest.param(
        PROVIDER_TOML + CLIENT_TOML + "[[clients]]\nid = 'team-a'\nkey_env = 'K'\n",
        {},
        "clients[1].id",
        id="duplicate-client-id",
    ),
    pytest.param(
        PROVIDER_TOML + CLIENT_TOML + f"[[clients]]\nid = 'b'\nkey_sha256 = '{CLIENT_DIGEST}'\n",
        {},
        "clients[1].key_sha256",
        id="duplicate-client-key",
    ),
    pytest.param(
        PROVIDER_TOML + CLIENT_TOML + "max_in_flight = { nowhere = 1 }\n",
        {},
        "clients[0].max_in_flight",
        id="cap-for-unknown-provider",
    ),
    pytest.param(
        PROVIDER_TOML + CLIENT_TOML + "max_in_flight = { umans = 0 }\n",
        {},
        "clients[0].max_in_flight.umans",
        id="cap-0",
    ),
    pytest.param(
        PROVIDER_TOML + CLIENT_TOML + "max_in_flight = { umans = true }\n",
        {},
        "clients[0].max_in_flight.umans",
        id="bool-for-cap",
    ),
    pytest.param(
        PROVIDER_TOML + CLIENT_TOML + "max_in_flight = 2\n",
        {},
        "clients[0].max_in_flight",
        id="number-for-caps",
    ),
]
BAD_URLS = [
    "ftp://api.umans.ai/v1",
    "https://",
    "https:///v1",
    "api.umans.ai/v1",
    "//api.umans.ai/v1",
    "https://api.umans.ai/v1?key=1",
    "https://api.umans.ai/v1#frag",
    "",
]
BAD_AUTHORITY_URLS = [
    "https://api.umans.ai:99999/v1",
    "https://api.umans.ai:port/v1",
    "https://api umans.ai/v1",
]
BAD_IDS = [
    "",
    "Umans",
    "-umans",
    "_umans",
    "um ans",
    "um/ans",
    "umans.ai",
    "x" * 65,
    "umans\n",
    "ümans",
]


@pytest.mark.parametrize(("text", "env", "key"), ERROR_CASES)
def test_config_error_is_one_line_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, env: dict[str, str], key: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with one_line_error(key):
        load_text(tmp_path, text)


def test_a_bad_regex_is_one_line_naming_the_provider_key(tmp_path: Path) -> None:
    with one_line_error("providers[0].reduce_on_429_match", "regular expression"):
        load_text(tmp_path, PROVIDER_TOML + "reduce_on_429_match = '[a-'\n")


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(PROVIDER_TOML + "reduce_on_429 = 'match'\n", id="provider"),
        pytest.param("[admission]\nreduce_on_429 = 'match'\n" + PROVIDER_TOML, id="admission"),
        pytest.param(
            "[admission]\nreduce_on_429 = 'match'\nreduce_on_429_match = 'x'\n"
            + PROVIDER_TOML
            + "reduce_on_429_match = ''\n",
            id="emptied-by-the-provider",
        ),
    ],
)
def test_match_without_a_pattern_is_an_error(tmp_path: Path, text: str) -> None:
    with one_line_error("providers[0].reduce_on_429_match", '"match"'):
        load_text(tmp_path, text)


def test_match_and_its_pattern_may_come_from_different_tables(tmp_path: Path) -> None:
    text = "[admission]\nreduce_on_429 = 'match'\n" + PROVIDER_TOML
    text += "reduce_on_429_match = 'concurrency'\n"
    (resolved,) = resolve_providers(load_text(tmp_path, text))
    policy = resolved.policy
    assert (policy.reduce_on_429, policy.reduce_on_429_match) == ("match", "concurrency")


def test_provider_admitted_paths_must_be_absolute(tmp_path: Path) -> None:
    with one_line_error("providers[0].admitted_paths"):
        load_text(tmp_path, PROVIDER_TOML + "admitted_paths = ['chat/completions']\n")


@pytest.mark.parametrize(
    "url",
    BAD_URLS + [pytest.param(url, id=f"bad authority {url}") for url in BAD_AUTHORITY_URLS],
)
def test_bad_base_url_is_rejected(tmp_path: Path, url: str) -> None:
    with one_line_error("providers[0].base_url"):
        load_text(tmp_path, provider_table(base_url=url))


@pytest.mark.parametrize("provider_id", BAD_IDS)
def test_bad_provider_id_is_rejected(tmp_path: Path, provider_id: str) -> None:
    with one_line_error("providers[0].id"):
        load_text(tmp_path, provider_table(provider_id))


@pytest.mark.parametrize("provider_id", ["a", "0", "umans", "open-ai_2", "x" * 64])
def test_good_provider_ids_are_accepted(tmp_path: Path, provider_id: str) -> None:
    assert load_text(tmp_path, provider_table(provider_id)).providers[0].id == provider_id


def test_duplicate_id_names_both_places(tmp_path: Path) -> None:
    with one_line_error("providers[2].id", "umans"):
        load_text(tmp_path, PROVIDER_TOML + SECOND_PROVIDER_TOML + PROVIDER_TOML)


def test_two_defaults_names_them(tmp_path: Path) -> None:
    text = PROVIDER_TOML + "default = true\n" + SECOND_PROVIDER_TOML + "default = true\n"
    with one_line_error("umans", "openai"):
        load_text(tmp_path, text)


def test_no_config_file_says_where_it_looked_and_how_to_pass_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with one_line_error(
        "no config file found",
        str(tmp_path),
        "--config PATH",
        "$SLUICE_CONFIG",
        "examples/sim.toml",
    ):
        load(None)


def test_a_file_without_providers_says_one_is_required(tmp_path: Path) -> None:
    with one_line_error("providers", "[[providers]]"):
        load_text(tmp_path, "[server]\nport = 1\n")
    with one_line_error("providers", "[[providers]]"):
        load_text(tmp_path, "providers = []\n")


def test_unset_api_key_env_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UMANS_TEST_UNSET_KEY", raising=False)
    settings = load_text(tmp_path, PROVIDER_TOML + "api_key_env = 'UMANS_TEST_UNSET_KEY'\n")
    with one_line_error("providers[0].api_key_env", "UMANS_TEST_UNSET_KEY"):
        resolve_providers(settings)


def test_empty_api_key_env_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UMANS_API_KEY", "")
    settings = load_text(
        tmp_path, SECOND_PROVIDER_TOML + PROVIDER_TOML + "api_key_env = 'UMANS_API_KEY'\n"
    )
    with one_line_error("providers[1].api_key_env", "UMANS_API_KEY"):
        resolve_providers(settings)


def test_cap_for_an_unknown_provider_names_it(tmp_path: Path) -> None:
    with one_line_error("clients[0].max_in_flight", "'nowhere'", "umans"):
        load_text(tmp_path, PROVIDER_TOML + CLIENT_TOML + "max_in_flight = { nowhere = 1 }\n")


def test_duplicate_client_id_names_it(tmp_path: Path) -> None:
    text = PROVIDER_TOML + CLIENT_TOML + "[[clients]]\nid = 'team-a'\nkey_env = 'K'\n"
    with one_line_error("clients[1].id", "team-a"):
        load_text(tmp_path, text)


def test_unset_client_key_env_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEAM_TEST_UNSET_KEY", raising=False)
    text = PROVIDER_TOML + CLIENT_TOML + "[[clients]]\nid = 'b'\nkey_env = 'TEAM_TEST_UNSET_KEY'\n"
    settings = load_text(tmp_path, text)
    with one_line_error("clients[1].key_env", "TEAM_TEST_UNSET_KEY"):
        resolve_clients(settings)


def test_a_key_from_the_environment_equal_to_a_digest_is_a_duplicate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEAM_B_KEY", CLIENT_KEY)
    text = PROVIDER_TOML + CLIENT_TOML + toml_table("[[clients]]", ENV_KEYED_CLIENT)
    settings = load_text(tmp_path, text)
    with one_line_error("clients[1].key_env", "clients[0]"):
        resolve_clients(settings)
    assert CLIENT_KEY not in str(settings)


def test_resolve_clients_reads_keys_as_digests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEAM_B_KEY", "client-key-b")
    text = PROVIDER_TOML + CLIENT_TOML.replace(CLIENT_DIGEST, CLIENT_DIGEST.upper())
    text += "max_in_flight = { umans = 3 }\n" + toml_table("[[clients]]", ENV_KEYED_CLIENT)
    team_a, team_b = resolve_clients(load_text(tmp_path, text))
    assert (team_a.id, team_a.key_sha256, dict(team_a.max_in_flight)) == (
        "team-a",
        hashlib.sha256(CLIENT_KEY.encode()).digest(),
        {"umans": 3},
    )
    assert (team_b.id, team_b.key_sha256, dict(team_b.max_in_flight)) == (
        "team-b",
        hashlib.sha256(b"client-key-b").digest(),
        {},
    )


def test_client_caps_resolve_onto_every_providers_policy(tmp_path: Path) -> None:
    text = PROVIDER_TOML + SECOND_PROVIDER_TOML + CLIENT_TOML + "max_in_flight = { openai = 2 }\n"
    text += "[[clients]]\nid = 'b'\nkey_env = 'UNUSED'\nmax_in_flight = { umans = 1 }\n"
    umans, openai = resolve_providers(load_text(tmp_path, text))
    assert umans.policy.client_max_in_flight == (("team-a", None), ("b", 1))
    assert openai.policy.client_max_in_flight == (("team-a", 2), ("b", None))
    (alone,) = resolve_providers(load_text(tmp_path, PROVIDER_TOML))
    assert alone.policy.client_max_in_flight == ()


def test_clients_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_CLIENTS", json.dumps([{"id": "c", "key_sha256": CLIENT_DIGEST}]))
    monkeypatch.setenv("SLUICE_CLIENTS__0__MAX_IN_FLIGHT", '{"umans": 4}')
    (client,) = load_text(tmp_path, PROVIDER_TOML).clients
    assert (client.id, client.key_sha256, client.max_in_flight) == (
        "c",
        CLIENT_DIGEST,
        {"umans": 4},
    )


def test_client_keys_from_the_environment_are_redacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEAM_B_KEY", "client-key-b")
    text = PROVIDER_TOML + toml_table("[[clients]]", ENV_KEYED_CLIENT)
    assert "client-key-b" in secrets(load_text(tmp_path, text))


def test_invalid_toml_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = = 1\n")
    with one_line_error(str(path), "invalid TOML", "line 2"):
        load(path)


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n" + PROVIDER_TOML.encode())
    with one_line_error(str(path)):
        load(path)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with one_line_error(str(path), "No such file"):
        load(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with one_line_error(str(tmp_path)):
        load(tmp_path)


def test_unknown_key_with_a_newline_stays_on_one_line(tmp_path: Path) -> None:
    with one_line_error("server."):
        load_text(tmp_path, '[server]\n"po\\nrt" = 1\n' + PROVIDER_TOML)


def test_infinite_seconds_are_rejected(tmp_path: Path) -> None:
    with one_line_error("server.shutdown_grace_s"):
        load_text(tmp_path, "[server]\nshutdown_grace_s = inf\n" + PROVIDER_TOML)


def test_missing_ca_bundle_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    with one_line_error("server.ca_bundle"):
        load_text(tmp_path, f"[server]\nca_bundle = {toml_value(str(missing))}\n" + PROVIDER_TOML)


# --- the CLI: exit code 2, one line, no traceback ------------------------------------


def clean_environ(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SLUICE_")}
    return {**env, **extra}


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        pytest.param("[server]\nprot = 1\n" + PROVIDER_TOML, {}, "server.prot", id="unknown-key"),
        pytest.param(
            PROVIDER_TOML, {"SLUICE_SERVER__PORT": "abc"}, "server.port", id="bad-env-var"
        ),
        pytest.param(
            PROVIDER_TOML, {"SLUICE_ADMISION__COOLDOWN_MS": "1"}, "admision", id="unknown-env-var"
        ),
        pytest.param(
            PROVIDER_TOML + "api_key_env = 'UMANS_TEST_UNSET_KEY'\n",
            {},
            "providers[0].api_key_env",
            id="unset-key-variable",
        ),
        pytest.param(
            PROVIDER_TOML + "[[clients]]\nid = 'a'\nkey_env = 'TEAM_TEST_UNSET_KEY'\n",
            {},
            "clients[0].key_env",
            id="unset-client-key-variable",
        ),
    ],
)
def test_serve_with_a_bad_config_exits_2_with_one_line(
    tmp_path: Path, text: str, env: dict[str, str], key: str
) -> None:
    path = write(tmp_path, text, "bad.toml")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path)],
        cwd=tmp_path,
        env=clean_environ(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("config error:")
    assert key in lines[0]
    assert result.stdout == ""


# --- config_path --------------------------------------------------------------------


def test_config_path_prefers_the_explicit_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, PROVIDER_TOML)
    monkeypatch.setenv("SLUICE_CONFIG", "/from/env.toml")
    assert config_path("/explicit.toml") == Path("/explicit.toml")


def test_config_path_then_sluice_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, PROVIDER_TOML)
    monkeypatch.setenv("SLUICE_CONFIG", "/from/env.toml")
    assert config_path(None) == Path("/from/env.toml")


def test_config_path_then_sluice_toml_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, PROVIDER_TOML)
    found = config_path(None)
    assert found is not None
    assert found.resolve() == (tmp_path / "sluice.toml").resolve()
    assert load(found).providers[0].id == "umans"


def test_config_path_none_without_any(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert config_path(None) is None


def test_sluice_config_is_not_an_unknown_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, PROVIDER_TOML)
    monkeypatch.setenv("SLUICE_CONFIG", str(path))
    assert load(config_path(None)).providers[0].id == "umans"


# --- resolve_providers --------------------------------------------------------------


def test_provider_overrides_beat_admission_and_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTHER_API_KEY", "sk-other")
    text = toml_table("[server]", NON_DEFAULT["server"])
    text += toml_table("[admission]", NON_DEFAULT["admission"])
    text += toml_table("[[providers]]", NON_DEFAULT_PROVIDER)
    (resolved,) = resolve_providers(load_text(tmp_path, text))
    for key in AdmissionSettings.model_fields:
        assert plain(getattr(resolved.policy, key)) == NON_DEFAULT_PROVIDER[key], key
    assert resolved.read_timeout_s == NON_DEFAULT_PROVIDER["read_timeout_s"]
    assert resolved.connect_timeout_s == NON_DEFAULT_PROVIDER["connect_timeout_s"]
    assert (resolved.policy.limit, resolved.policy.usage_gate, resolved.default) == (4, True, True)
    assert resolved.api_key == "sk-other"


def test_admission_and_server_values_fill_in(tmp_path: Path) -> None:
    text = toml_table("[server]", NON_DEFAULT["server"])
    text += toml_table("[admission]", NON_DEFAULT["admission"])
    text += PROVIDER_TOML
    (resolved,) = resolve_providers(load_text(tmp_path, text))
    for key in AdmissionSettings.model_fields:
        assert plain(getattr(resolved.policy, key)) == NON_DEFAULT["admission"][key], key
    assert resolved.read_timeout_s == NON_DEFAULT["server"]["upstream_read_timeout_s"]
    assert resolved.connect_timeout_s == NON_DEFAULT["server"]["upstream_connect_timeout_s"]
    assert resolved.policy.limit is None
    assert resolved.policy.usage_gate is False
    assert resolved.api_key is None


def test_builtin_defaults_fill_in(tmp_path: Path) -> None:
    (resolved,) = resolve_providers(load_text(tmp_path, PROVIDER_TOML))
    for key in AdmissionSettings.model_fields:
        assert plain(getattr(resolved.policy, key)) == SPEC_DEFAULTS["admission"][key], key
    assert resolved.read_timeout_s == 600
    assert resolved.connect_timeout_s == 10


def test_a_single_provider_is_the_default(tmp_path: Path) -> None:
    (resolved,) = resolve_providers(load_text(tmp_path, PROVIDER_TOML))
    assert resolved.default is True


def test_several_providers_have_no_default_unless_marked(tmp_path: Path) -> None:
    both = resolve_providers(load_text(tmp_path, PROVIDER_TOML + SECOND_PROVIDER_TOML))
    assert [p.default for p in both] == [False, False]
    marked = load_text(tmp_path, PROVIDER_TOML + SECOND_PROVIDER_TOML + "default = true\n")
    assert [p.default for p in resolve_providers(marked)] == [False, True]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.umans.ai/v1/", "https://api.umans.ai/v1"),
        ("https://api.umans.ai/v1", "https://api.umans.ai/v1"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
    ],
)
def test_base_url_trailing_slash_is_stripped(tmp_path: Path, url: str, expected: str) -> None:
    (resolved,) = resolve_providers(load_text(tmp_path, provider_table(base_url=url)))
    assert resolved.base_url == expected


def test_key_is_read_from_api_key_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UMANS_API_KEY", "sk-from-env")
    text = PROVIDER_TOML + "api_key_env = 'UMANS_API_KEY'\n"
    text += SECOND_PROVIDER_TOML + "api_key = 'sk-literal'\n"
    umans, openai = resolve_providers(load_text(tmp_path, text))
    assert umans.api_key == "sk-from-env"
    assert openai.api_key == "sk-literal"


def test_empty_literal_key_means_no_key(tmp_path: Path) -> None:
    (resolved,) = resolve_providers(load_text(tmp_path, PROVIDER_TOML + "api_key = ''\n"))
    assert resolved.api_key is None


def test_keys_never_show_in_repr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UMANS_API_KEY", "sk-env-secret-1")
    text = "[server]\nadmin_token = 'admin-secret-3'\n"
    text += PROVIDER_TOML + "api_key_env = 'UMANS_API_KEY'\n"
    text += SECOND_PROVIDER_TOML + "api_key = 'sk-literal-secret-2'\n"
    settings = load_text(tmp_path, text)
    resolved = resolve_providers(settings)
    assert [p.api_key for p in resolved] == ["sk-env-secret-1", "sk-literal-secret-2"]
    shown = " ".join([repr(settings), str(settings), *map(repr, resolved), *map(str, resolved)])
    for secret in ("sk-env-secret-1", "sk-literal-secret-2", "admin-secret-3"):
        assert secret not in shown
    assert "umans" in repr(resolved[0])
