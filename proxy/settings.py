"""Configuration: a TOML file plus `SLUICE_` environment overrides, validated once at start.

Every key of SPEC section 2 is here and no other: unknown keys are errors, so a typo
never silently falls back to a default. `load()` turns any problem into one
`ConfigError` line that names the key.
"""

from __future__ import annotations

import copy
import json
import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
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
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from proxy.errors import ConfigError

ENV_PREFIX = "SLUICE_"
_HOST = re.compile(r"^[A-Za-z0-9._~\-]+$|^\[[0-9A-Fa-f:.]+\]$|^[0-9A-Fa-f:.]+$")
MAX_LIMIT = 10_000
MAX_COOLDOWN_MS = 3_600_000


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
    # The edge (SPEC section 11).
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
    cooldown_ms: CooldownMs = 350
    slot_timeout_s: PositiveSeconds = 300
    watchdog_interval_s: PositiveSeconds = 30
    pause_s: NonNegativeSeconds = 30
    usage_poll_interval_ms: PositiveInt = 1000
    queue_timeout_s: PositiveSeconds = 600
    max_queue: Count = 10_000
    retry_on_429: Count = 2
    admitted_paths: tuple[str, ...] = ("/chat/completions", "/completions", "/responses")

    @model_validator(mode="after")
    def _paths_are_absolute(self) -> AdmissionSettings:
        _check_paths(self.admitted_paths)
        return self


def _check_paths(paths: tuple[str, ...] | None) -> None:
    for path in paths or ():
        if not path.startswith("/"):
            raise ValueError(f"admitted_paths: {path!r} must start with '/'")


class ProviderSettings(_Section):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    base_url: str
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    auth_header: AuthHeader = "authorization"
    limit: Limit | None = None
    usage_gate: bool = False
    default: bool = False
    read_timeout_s: PositiveSeconds | None = None
    connect_timeout_s: PositiveSeconds | None = None
    # Per-provider overrides of [admission]; None means "use the [admission] value".
    cooldown_ms: CooldownMs | None = None
    slot_timeout_s: PositiveSeconds | None = None
    watchdog_interval_s: PositiveSeconds | None = None
    pause_s: NonNegativeSeconds | None = None
    usage_poll_interval_ms: PositiveInt | None = None
    queue_timeout_s: PositiveSeconds | None = None
    max_queue: Count | None = None
    retry_on_429: Count | None = None
    admitted_paths: tuple[str, ...] | None = None

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
        _check_paths(self.admitted_paths)
        if parts.query or parts.fragment:
            raise ValueError("base_url: must not have a query or fragment")
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("api_key: set api_key or api_key_env, not both")
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
    admission: AdmissionSettings = AdmissionSettings()
    providers: tuple[ProviderSettings, ...] = Field(min_length=1)
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
        return self


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Overlay `SLUICE_SECTION__KEY=value` variables onto the TOML data.

    Done here rather than by pydantic-settings' env source for two reasons: an
    unknown `SLUICE_*` name must be an error like an unknown TOML key (a typo
    such as `SLUICE_ADMISION__COOLDOWN_MS` must not be ignored), and a list
    entry must be addressable by index (`SLUICE_PROVIDERS__0__LIMIT=3`).
    """
    merged = copy.deepcopy(data)
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper == "SLUICE_CONFIG":
            continue
        path = upper[len(ENV_PREFIX) :].lower().split("__")
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
    """One provider with every [admission] default resolved and its key read."""

    id: str
    base_url: str
    api_key: str | None
    limit: int | None
    usage_gate: bool
    default: bool
    connect_timeout_s: float
    read_timeout_s: float
    cooldown_ms: int
    slot_timeout_s: float
    watchdog_interval_s: float
    pause_s: float
    usage_poll_interval_ms: int
    queue_timeout_s: float
    max_queue: int
    retry_on_429: int
    admitted_paths: tuple[str, ...]
    auth_header: AuthHeader = "authorization"  # where the provider key goes (SPEC 4)

    def __repr__(self) -> str:  # never show the key
        return f"ProviderConfig(id={self.id!r}, base_url={self.base_url!r}, limit={self.limit})"


def resolve_providers(settings: Settings) -> list[ProviderConfig]:
    """Merge each provider with the [admission] and [server] defaults and read its key."""
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

        def pick(name: str, provider: ProviderSettings = p) -> Any:
            own = getattr(provider, name)
            return getattr(settings.admission, name) if own is None else own

        resolved.append(
            ProviderConfig(
                id=p.id,
                base_url=p.base_url.rstrip("/"),
                api_key=key,
                limit=p.limit,
                usage_gate=p.usage_gate,
                default=p.default or len(settings.providers) == 1,
                connect_timeout_s=p.connect_timeout_s or settings.server.upstream_connect_timeout_s,
                read_timeout_s=p.read_timeout_s or settings.server.upstream_read_timeout_s,
                cooldown_ms=pick("cooldown_ms"),
                slot_timeout_s=pick("slot_timeout_s"),
                watchdog_interval_s=pick("watchdog_interval_s"),
                pause_s=pick("pause_s"),
                usage_poll_interval_ms=pick("usage_poll_interval_ms"),
                queue_timeout_s=pick("queue_timeout_s"),
                max_queue=pick("max_queue"),
                retry_on_429=pick("retry_on_429"),
                admitted_paths=pick("admitted_paths"),
                auth_header=p.auth_header,
            )
        )
    return resolved


def secrets(settings: Settings) -> list[str]:
    """Every secret the configuration holds (provider keys, the admin token), for the
    redactor of logs and the events journal."""
    found = [p.api_key for p in resolve_providers(settings) if p.api_key]
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
    try:
        return Settings(**_apply_env(data, os.environ))
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def _one_line(exc: ValidationError) -> str:
    """The first validation error as `config error: <key>: <what is wrong>`, on one
    line even when a quoted TOML key holds a newline."""
    return _describe(exc).replace("\r", "\\r").replace("\n", "\\n")


def _describe(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    key = ""
    for part in err["loc"]:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"config error: {key}: unknown key"
    if err["type"] == "missing" and key == "providers":
        return "config error: providers: at least one [[providers]] entry is required"
    if err["type"] == "value_error" and re.match(r"^[\w\[\].]+: ", message):
        # Our model validators start their message with the field they reject.
        return f"config error: {key + '.' if key else ''}{message}"
    return f"config error: {key}: {message}"
