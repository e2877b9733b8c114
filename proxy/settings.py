"""Configuration: a TOML file plus `SLUICE_` environment overrides, validated once at start.

Every key the README documents is here and no other: unknown keys are errors, so a typo
never silently falls back to a default. `load()` turns any problem into one
`ConfigError` line that names the key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from proxy.admission import Policy
from proxy.admission.reduce import ReduceRule
from proxy.errors import ConfigError

ENV_PREFIX = "SLUICE_"
ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_HOST = re.compile(r"^[A-Za-z0-9._~\-]+$|^\[[0-9A-Fa-f:.]+\]$|^[0-9A-Fa-f:.]+$")
MAX_LIMIT = 10_000
MAX_COOLDOWN_MS = 3_600_000
MIN_KEEPALIVE_S = 0.1


def _not_bool(value: Any) -> Any:
    """TOML `true` is not the number 1, whatever Python thinks."""
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Number = BeforeValidator(_not_bool)
Limit = Annotated[int, Number, Field(ge=1, le=MAX_LIMIT)]
CooldownMs = Annotated[int, Number, Field(ge=0, le=MAX_COOLDOWN_MS)]
PositiveSeconds = Annotated[float, Number, Field(gt=0, allow_inf_nan=False)]
NonNegativeSeconds = Annotated[float, Number, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Number, Field(ge=0)]
PositiveInt = Annotated[int, Number, Field(ge=1)]
Port = Annotated[int, Number, Field(ge=0, le=65535)]
# Below 1 KiB not even a request line with a long path and a Host header fits.
HeadBytes = Annotated[int, Number, Field(ge=1024)]
AuthHeader = Literal["authorization", "x-api-key", "api-key"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: Port = 8080
    admin_token: SecretStr = SecretStr("")
    database: Path = Path("sluice.db")
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_grace_s: NonNegativeSeconds = 30
    max_body_bytes: PositiveInt = 33_554_432
    upstream_connect_timeout_s: PositiveSeconds = 10
    upstream_read_timeout_s: PositiveSeconds = 600
    ca_bundle: str = ""
    # The edge: limits on clients (README, "Limits on clients").
    allow_open_admin: bool = False
    max_header_bytes: HeadBytes = 65_536
    max_headers: PositiveInt = 100
    client_header_timeout_s: PositiveSeconds = 10
    client_body_timeout_s: PositiveSeconds = 60
    max_connections: PositiveInt = 10_000
    max_queued_body_bytes: PositiveInt = 1_073_741_824

    @model_validator(mode="after")
    def _ca_bundle_exists(self) -> ServerSettings:
        if self.ca_bundle:
            if not Path(self.ca_bundle).is_file():
                raise ValueError(f"ca_bundle: no such file {self.ca_bundle!r}")
            try:
                ssl.create_default_context(cafile=self.ca_bundle)
            except ssl.SSLError:
                raise ValueError(
                    f"ca_bundle: {self.ca_bundle!r} holds no PEM certificate"
                ) from None
        return self


class AdmissionSettings(_Section):
    """The per-provider admission keys, all optional: `[admission]` sets them for every
    provider, a `[[providers]]` entry overrides them for itself, and what neither sets
    keeps `Policy`'s default. A new knob is a field here and one in `Policy`."""

    cooldown_ms: CooldownMs | None = None
    slot_timeout_s: PositiveSeconds | None = None
    watchdog_interval_s: PositiveSeconds | None = None
    pause_s: NonNegativeSeconds | None = None
    usage_poll_interval_ms: PositiveInt | None = None
    queue_timeout_s: PositiveSeconds | None = None
    max_queue: Count | None = None
    retry_on_429: Count | None = None
    admitted_paths: tuple[str, ...] | None = None
    derive_prompt_start: bool | None = None
    reduce_on_429: ReduceRule | None = None
    reduce_on_429_match: str | None = None
    restore_after_s: NonNegativeSeconds | None = None
    queued_keepalive_s: NonNegativeSeconds | None = None

    @model_validator(mode="after")
    def _paths_are_absolute(self) -> Self:
        for path in self.admitted_paths or ():
            if not path.startswith("/"):
                raise ValueError(f"admitted_paths: {path!r} must start with '/'")
        return self

    @model_validator(mode="after")
    def _pattern_compiles(self) -> Self:
        if self.reduce_on_429_match:
            try:
                re.compile(self.reduce_on_429_match)
            except re.error as exc:
                raise ValueError(
                    f"reduce_on_429_match: not a valid Python regular expression ({exc})"
                ) from None
        return self

    @model_validator(mode="after")
    def _keepalive_is_off_or_sane(self) -> Self:
        # A comment every millisecond per waiter would cost more than it saves.
        keepalive = self.queued_keepalive_s
        if keepalive is not None and 0 < keepalive < MIN_KEEPALIVE_S:
            raise ValueError(
                f"queued_keepalive_s: must be 0 (off) or at least {MIN_KEEPALIVE_S:g} seconds,"
                f" got {keepalive:g}"
            )
        return self

    def overrides(self) -> dict[str, Any]:
        """The admission keys this section sets."""
        return self.model_dump(include=set(_ADMISSION_KEYS), exclude_none=True)


_ADMISSION_KEYS = frozenset(AdmissionSettings.model_fields)


class AdmissionSection(AdmissionSettings):
    """`[admission]`: the per-provider keys' common values, plus what is one for all."""

    prompt_memory_s: PositiveSeconds = 86_400


class ProviderSettings(AdmissionSettings):
    id: str = Field(pattern=ID_PATTERN)
    base_url: str
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    auth_header: AuthHeader = "authorization"
    limit: Limit | None = None
    usage_gate: bool = False
    default: bool = False
    read_timeout_s: PositiveSeconds | None = None
    connect_timeout_s: PositiveSeconds | None = None

    @model_validator(mode="after")
    def _check(self) -> ProviderSettings:
        if self.id == "v1":
            raise ValueError("id: 'v1' would make /v1/v1/... ambiguous; choose another id")
        parts = urlsplit(self.base_url)
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError(f"base_url: {self.base_url!r} has an invalid port") from None
        host = parts.hostname or ""
        if parts.scheme not in ("http", "https") or not _HOST.match(host):
            raise ValueError(f"base_url: {self.base_url!r} is not an http(s) URL")
        if parts.query or parts.fragment:
            raise ValueError("base_url: must not have a query or fragment")
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("api_key: set api_key or api_key_env, not both")
        return self


class ClientSettings(_Section):
    """A `[[clients]]` entry : who may use the provider routes, and
    the share of each provider it may hold. The file names the key only by its digest
    or by the environment variable that holds it."""

    id: str = Field(pattern=ID_PATTERN)
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9A-Fa-f]{64}$")
    key_env: str | None = None
    max_in_flight: dict[str, PositiveInt] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_key(self) -> ClientSettings:
        if (self.key_sha256 is None) == (self.key_env is None):
            raise ValueError("key_sha256: set key_sha256 (hex SHA-256 of the key) or key_env")
        return self


class ClusterSettings(_Section):
    redis_url: str = ""
    lease_s: PositiveSeconds = 15
    instance_id: str = ""


class Settings(BaseSettings):
    """The whole configuration. Build it with `load()`, which formats errors."""

    model_config = SettingsConfigDict(
        env_prefix="SLUICE_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    server: ServerSettings = ServerSettings()
    admission: AdmissionSection = AdmissionSection()
    providers: tuple[ProviderSettings, ...] = Field(min_length=1)
    clients: tuple[ClientSettings, ...] = ()
    cluster: ClusterSettings = ClusterSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `load()` merges the environment into the TOML data itself (see
        # `_apply_env`), so the only source left is the merged data.
        return (init_settings,)

    @model_validator(mode="after")
    def _check_providers(self) -> Settings:
        seen: set[str] = set()
        for i, provider in enumerate(self.providers):
            if provider.id in seen:
                raise ValueError(f"providers[{i}].id: duplicate provider id {provider.id!r}")
            seen.add(provider.id)
        defaults = [p.id for p in self.providers if p.default]
        if len(defaults) > 1:
            raise ValueError(f"providers: more than one default provider ({', '.join(defaults)})")
        common = self.admission
        for i, p in enumerate(self.providers):
            # Either key may come from [admission] or the provider: judge the pair resolved.
            rule = p.reduce_on_429 or common.reduce_on_429
            pattern = p.reduce_on_429_match
            if pattern is None:
                pattern = common.reduce_on_429_match
            if rule == "match" and not pattern:
                raise ValueError(
                    f"providers[{i}].reduce_on_429_match: must be a non-empty regular "
                    f'expression when reduce_on_429 = "match"'
                )
        return self

    @model_validator(mode="after")
    def _check_clients(self) -> Settings:
        providers = [p.id for p in self.providers]
        ids: set[str] = set()
        digests: dict[str, int] = {}
        for i, client in enumerate(self.clients):
            if client.id in ids:
                raise ValueError(f"clients[{i}].id: duplicate client id {client.id!r}")
            ids.add(client.id)
            for provider_id in client.max_in_flight:
                if provider_id not in providers:
                    raise ValueError(
                        f"clients[{i}].max_in_flight: unknown provider {provider_id!r} "
                        f"(providers: {', '.join(providers)})"
                    )
            if client.key_sha256 is not None:
                digest = client.key_sha256.lower()
                if digest in digests:
                    raise ValueError(
                        f"clients[{i}].key_sha256: the same key as clients[{digests[digest]}]"
                    )
                digests[digest] = i
        return self


# Variables with the `SLUICE_` prefix that are not config keys: the config file's
# path, and the two that `sluice status` reads (the proxy's address, the admin
# token it sends). `sluice serve` ignores them rather than calling them unknown.
NOT_CONFIG_VARIABLES = frozenset({"SLUICE_CONFIG", "SLUICE_URL", "SLUICE_ADMIN_TOKEN"})

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class _EnvVar:
    """A `SLUICE_*` variable as written, and the place in the config data it set."""

    name: str
    loc: Loc


def _apply_env(
    data: dict[str, Any], environ: Mapping[str, str], origins: list[_EnvVar] | None = None
) -> dict[str, Any]:
    """Overlay `SLUICE_SECTION__KEY=value` variables onto the TOML data.

    Done here rather than by pydantic-settings' env source for two reasons: an
    unknown `SLUICE_*` name must be an error like an unknown TOML key (a typo
    such as `SLUICE_ADMISION__COOLDOWN_MS` must not be ignored), and a list
    entry must be addressable by index (`SLUICE_PROVIDERS__0__LIMIT=3`).
    Each variable applied is appended to `origins`, so that an error can name it.
    """
    merged = copy.deepcopy(data)
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NOT_CONFIG_VARIABLES:
            continue
        path = upper[len(ENV_PREFIX) :].lower().split("__")
        if origins is not None:
            origins.append(_EnvVar(name, tuple(int(p) if p.isdigit() else p for p in path)))
        target: Any = merged
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if last:
                try:
                    value = _parse_env_value(environ[name])
                except ValueError as exc:
                    raise ConfigError(f"config error: {name}: {exc}") from None
            else:
                value = [] if path[depth + 1].isdigit() else {}
            if isinstance(target, list):
                # An index one past the end adds an entry, so a provider can be
                # given entirely by SLUICE_PROVIDERS__0__ID=... variables.
                if not part.isdigit() or int(part) > len(target):
                    raise ConfigError(f"config error: {name}: no list entry {part}")
                if int(part) == len(target):
                    target.append(value)
                elif last:
                    target[int(part)] = value
                target = target[int(part)]
            elif isinstance(target, dict):
                if last:
                    target[part] = value
                target = target.setdefault(part, value)
            else:
                raise ConfigError(f"config error: {name}: {path[depth - 1]} is not a section")
    return merged


def _parse_env_value(raw: str) -> Any:
    """JSON lists and objects are decoded; anything else stays a string for pydantic
    to coerce, so `SLUICE_SERVER__PORT=abc` is reported as a bad integer."""
    if raw.strip()[:1] in ("[", "{"):
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ValueError(f"invalid JSON: {exc}") from None
    return raw


@dataclass(frozen=True)
class ProviderConfig:
    """One provider with its admission policy resolved and its key read."""

    id: str
    base_url: str
    api_key: str | None
    default: bool
    connect_timeout_s: float
    read_timeout_s: float
    policy: Policy
    auth_header: AuthHeader = "authorization"  # where the provider key goes

    def __repr__(self) -> str:  # never show the key
        return (
            f"ProviderConfig(id={self.id!r}, base_url={self.base_url!r}, limit={self.policy.limit})"
        )


def resolve_providers(settings: Settings) -> list[ProviderConfig]:
    """Each provider's policy (`Policy` defaults, then `[admission]`, then its own keys)
    with the `[server]` timeouts, and its key read."""
    default_policy = dataclasses.replace(Policy(), **settings.admission.overrides())
    resolved = []
    for i, p in enumerate(settings.providers):
        key: str | None = None
        if p.api_key is not None:
            key = p.api_key.get_secret_value() or None
        elif p.api_key_env is not None:
            key = os.environ.get(p.api_key_env)
            if not key:
                raise ConfigError(
                    f"config error: providers[{i}].api_key_env: "
                    f"environment variable {p.api_key_env} is not set"
                )
        resolved.append(
            ProviderConfig(
                id=p.id,
                base_url=p.base_url.rstrip("/"),
                api_key=key,
                default=p.default or len(settings.providers) == 1,
                connect_timeout_s=p.connect_timeout_s or settings.server.upstream_connect_timeout_s,
                read_timeout_s=p.read_timeout_s or settings.server.upstream_read_timeout_s,
                policy=dataclasses.replace(
                    default_policy,
                    limit=p.limit,
                    usage_gate=p.usage_gate,
                    client_max_in_flight=tuple(
                        (c.id, c.max_in_flight.get(p.id)) for c in settings.clients
                    ),
                    **p.overrides(),
                ),
                auth_header=p.auth_header,
            )
        )
    return resolved


@dataclass(frozen=True)
class ClientConfig:
    """A configured client with its key as a SHA-256 digest (the key itself is never
    kept) and its caps per provider id."""

    id: str
    key_sha256: bytes
    max_in_flight: Mapping[str, int]


def resolve_clients(settings: Settings) -> list[ClientConfig]:
    """Each `[[clients]]` entry with its key's digest: `key_sha256` as given, or the
    SHA-256 of the `key_env` variable's value, read now. Two clients with one key are
    a config error (a key must say who is calling)."""
    resolved: list[ClientConfig] = []
    owners: dict[bytes, int] = {}
    for i, c in enumerate(settings.clients):
        if c.key_env is not None:
            key = os.environ.get(c.key_env)
            if not key:
                raise ConfigError(
                    f"config error: clients[{i}].key_env: "
                    f"environment variable {c.key_env} is not set"
                )
            digest = hashlib.sha256(key.encode()).digest()
        else:
            assert c.key_sha256 is not None  # the model requires one of the two
            digest = bytes.fromhex(c.key_sha256)
        if digest in owners:
            raise ConfigError(
                f"config error: clients[{i}].{'key_env' if c.key_env else 'key_sha256'}: "
                f"the same key as clients[{owners[digest]}]"
            )
        owners[digest] = i
        resolved.append(ClientConfig(c.id, digest, dict(c.max_in_flight)))
    return resolved


def secrets(settings: Settings) -> list[str]:
    """Every secret the configuration holds (provider keys, client keys read from the
    environment, the admin token), for the redactor of logs and the events journal."""
    found = [p.api_key for p in resolve_providers(settings) if p.api_key]
    found += [key for c in settings.clients if c.key_env and (key := os.environ.get(c.key_env))]
    token = settings.server.admin_token.get_secret_value()
    return [*found, token] if token else found


def config_path(explicit: str | None) -> Path | None:
    """`--config`, else `$SLUICE_CONFIG`, else `./sluice.toml` if present, else none."""
    if explicit:
        return Path(explicit)
    if env := os.environ.get("SLUICE_CONFIG"):
        return Path(env)
    default = Path("sluice.toml")
    return default if default.exists() else None


def load(path: Path | None) -> Settings:
    """Read and validate the configuration, raising `ConfigError` with one line on any problem."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"config error: {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config error: {path}: invalid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config error: {path}: not UTF-8 text") from None
    origins: list[_EnvVar] = []
    merged = _apply_env(data, os.environ, origins)
    try:
        return Settings(**merged)
    except ValidationError as exc:
        # An unknown key first: a misspelt name often explains a "missing" one too.
        errors = sorted(exc.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
        if path is None and not merged.get("providers"):
            # No file and no provider from the environment: that a provider is
            # missing says less than that the file is. Other mistakes come first.
            errors = [err for err in errors if err["loc"] != ("providers",)]
            if not errors:
                raise ConfigError(_no_config_file()) from None
        raise ConfigError(_one_line(errors[0], origins)) from None


def _no_config_file() -> str:
    return (
        "config error: no config file found (no --config, no $SLUICE_CONFIG, "
        f"no sluice.toml in {Path.cwd()}): pass --config PATH, set $SLUICE_CONFIG, "
        "or create ./sluice.toml (examples/sim.toml runs against `sluice sim`; "
        "config.example.toml documents every key)"
    )


def _one_line(err: ErrorDetails, origins: list[_EnvVar]) -> str:
    """A validation error as `config error: <key>: <what is wrong>`, on one line even
    when a quoted TOML key holds a newline."""
    return _describe(err, origins).replace("\r", "\\r").replace("\n", "\\n")


def _describe(err: ErrorDetails, origins: list[_EnvVar]) -> str:
    """`config error: <key>: <problem>`; `config error: <VARIABLE> (<key>): <problem>`
    when a `SLUICE_*` variable set the value; with `; did you mean ...?` after an
    unknown key that has a likely intended name."""
    loc: Loc = tuple(err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error" and (field := re.match(r"^([\w\[\].]+): ", message)):
        # Our model validators start their message with the field they reject.
        loc += _parse_key(field.group(1))
        message = message[field.end() :]
    unknown = err["type"] == "extra_forbidden"
    if unknown:
        message = "unknown key"
    elif err["loc"] == ("providers",) and err["type"] in ("missing", "too_short"):
        message = "at least one [[providers]] entry is required"
    var = _origin(loc, origins, unknown)
    suggestion = _suggest(loc) if unknown else None
    if var is None:
        hint = f"; did you mean {_key(suggestion)}?" if suggestion else ""
        if err["type"] == "missing" and any(v.loc[: len(loc) - 1] == loc[:-1] for v in origins):
            # An entry (partly) built from variables: name the one that would complete it.
            hint = f" (set {_variable(loc)})"
        return f"config error: {_key(loc)}: {message}{hint}"
    hint = ""
    if suggestion is not None:
        if len(var.loc) < len(loc):  # the mistake is inside the variable's JSON value
            hint = f"; did you mean {_key(suggestion)}?"
        else:
            hint = f"; did you mean {_variable(suggestion + var.loc[len(loc) :])}?"
    return f"config error: {var.name} ({_key(loc)}): {message}{hint}"


def _key(loc: Loc | None) -> str:
    """`providers[0].limit` for ("providers", 0, "limit")."""
    key = ""
    for part in loc or ():
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _parse_key(key: str) -> Loc:
    """The inverse of `_key`."""
    return tuple(
        int(part[1:-1]) if part.startswith("[") else part
        for part in re.findall(r"\[\d+\]|[^.\[\]]+", key)
    )


def _variable(loc: Loc) -> str:
    return ENV_PREFIX + "__".join(str(part).upper() for part in loc)


def _origin(loc: Loc, origins: list[_EnvVar], unknown: bool) -> _EnvVar | None:
    """The variable that put the value at `loc` there: one that set it or a JSON value
    holding it, or (for an unknown key) one that set something beneath it."""
    for var in origins:
        if loc[: len(var.loc)] == var.loc or (unknown and var.loc[: len(loc)] == loc):
            return var
    return None


def _suggest(loc: Loc) -> Loc | None:
    """Where an unknown key probably belongs: the same name in another table (a
    server key at the top level), else a close spelling in its own table."""
    *parent, name = loc
    own = _model_at(tuple(parent))
    if own is None or not isinstance(name, str):
        return None
    for section, field in Settings.model_fields.items():
        model = _model_in(field.annotation)
        if model is not None and model is not own and name in model.model_fields:
            entry: Loc = (section, 0) if _is_array(field.annotation) else (section,)
            return (*entry, name)
    close = difflib.get_close_matches(name, list(own.model_fields), n=1)
    return (*parent, close[0]) if close else None


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model whose fields are valid keys at `loc` (list indices skipped)."""
    model: type[BaseModel] | None = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model is not None else None
        model = _model_in(field.annotation) if field is not None else None
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The table model of a field: `ServerSettings`, or the entry of `tuple[X, ...]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None


def _is_array(annotation: Any) -> bool:
    return get_origin(annotation) in (tuple, list)
