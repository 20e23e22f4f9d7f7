"""gslb.yaml: the control plane's configuration, validated by pydantic.

A bad file is reported in one line naming the field (`load_settings` raises ConfigError;
`python -m api` prints it and exits 2). Tokens come from the file (`token`) or from the
environment (`token_env`, preferred: the file then holds no secret).

Numbers and booleans are strict (`port: true` or `port: "8080"` is an error, not port 1 or
8080). What only the files can tell is checked by `check_files`, before anything starts and
by `--check` alike: the TLS certificate and key load and belong together, and the SQLite
path is a database (or can become one).
"""

from __future__ import annotations

import os
import sqlite3
import ssl
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from api.budget import Budget, Limits
from contract.schemas import Name, Role


class ConfigError(Exception):
    """One line, naming the field and what was expected."""


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SqliteStoreSettings(_Config):
    kind: Literal["sqlite"] = "sqlite"
    path: Path = Path("gslb.db")


class EtcdStoreSettings(_Config):
    kind: Literal["etcd"]
    endpoints: list[Annotated[str, Field(pattern=r"^https?://")]] = Field(min_length=1)
    prefix: Annotated[str, Field(pattern=r"^/.*/$")] = "/anycast-edge/"
    request_timeout_s: Annotated[float, Field(strict=True, gt=0, le=30)] = 0.5
    deadline_s: Annotated[float, Field(strict=True, gt=0, le=120)] = 5.0
    #: A watch stream quiet this long makes its member prove it is alive (a status request
    #: answered within request_timeout_s) or the watch moves to another member.
    watch_probe_s: Annotated[float, Field(strict=True, gt=0, le=60)] = 1.0
    #: "changes": a heartbeat is written when its content changed or TTL/3 after the node's
    #: last write (api/heartbeat_writes.py); "every": each heartbeat is written.
    heartbeat_writes: Literal["changes", "every"] = "changes"


class TlsSettings(_Config):
    # FilePath: a missing file is a config error (one line, exit 2), not a traceback later.
    cert: FilePath
    key: FilePath


class TokenSettings(_Config):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    role: Role
    node: Name | None = None
    token: Annotated[SecretStr, Field(min_length=1)] | None = None
    token_env: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _check(self) -> TokenSettings:
        if (self.token is None) == (self.token_env is None):
            raise ValueError("set exactly one of token and token_env")
        if self.role is Role.NODE and self.node is None:
            raise ValueError("a node token needs `node`")
        if self.token is not None and not self.token.get_secret_value().strip():
            raise ValueError("token is blank")
        return self

    def secret(self) -> str:
        if self.token is not None:
            return self.token.get_secret_value()
        assert self.token_env is not None
        value = os.environ.get(self.token_env, "")
        if not value.strip():
            raise ConfigError(f"tokens[{self.name}].token_env: environment {self.token_env} unset")
        return value


class BudgetLimitSettings(_Config):
    #: Share of the healthy capacity (Mbit/s) that must stay in service, 0..1.
    min_share: Annotated[float, Field(strict=True, ge=0, le=1)] = 0.5
    #: Healthy nodes out of service at once; unset: no count bound (the share still holds).
    max_out: Annotated[int, Field(strict=True, ge=0)] | None = None

    def limits(self) -> Limits:
        return Limits(min_share=self.min_share, max_out=self.max_out)


class BudgetSettings(_Config):
    """The disruption budget (api/budget.py): per site and for the whole fleet."""

    site: BudgetLimitSettings = Field(default_factory=BudgetLimitSettings)
    fleet: BudgetLimitSettings = Field(default_factory=BudgetLimitSettings)

    def budget(self) -> Budget:
        return Budget(site=self.site.limits(), fleet=self.fleet.limits())


class Settings(_Config):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(strict=True, ge=0, le=65535)] = 8080
    tls: TlsSettings | None = None
    store: SqliteStoreSettings | EtcdStoreSettings = Field(
        default_factory=SqliteStoreSettings, discriminator="kind"
    )
    heartbeat_ttl_s: Annotated[float, Field(strict=True, ge=1, le=3600)] = 5.0
    sweep_interval_s: Annotated[float, Field(strict=True, gt=0, le=60)] = 0.5
    long_poll_max_s: Annotated[float, Field(strict=True, gt=0, le=300)] = 30.0
    max_body_bytes: Annotated[int, Field(strict=True, ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    #: An idle keep-alive connection is closed after this long. Longer than any node's
    #: heartbeat interval (agents allow up to 60 s), so a node keeps its one connection
    #: instead of reconnecting at every heartbeat (uvicorn's own default is 5 s).
    keep_alive_s: Annotated[int, Field(strict=True, ge=1, le=3600)] = 75
    tokens: list[TokenSettings] = Field(default_factory=list)
    budget: BudgetSettings = Field(default_factory=BudgetSettings)
    #: Fail open (api/panic.py): when fewer than this share of a site's (or the fleet's)
    #: nodes look alive, keep their last weights. 0 turns it off.
    panic_threshold: Annotated[float, Field(strict=True, ge=0, le=1)] = 0.5
    #: A weight change waits until the fleet's flow-sharing nodes report their flow tables
    #: in sync (api/flowsync.py), at most this long; then it is applied anyway, and the
    #: `flow-sync` event says so. 0: weight changes never wait.
    flow_sync_bound_s: Annotated[float, Field(strict=True, ge=0, le=60)] = 3.0
    #: `json`: one JSON object per log line (contract.logs: ts, level, logger, msg, component),
    #: for collectors.
    log_format: Literal["text", "json"] = "text"
    #: Unauthenticated reads; for a lab or a demo only.
    allow_anonymous_read: Annotated[bool, Field(strict=True)] = False

    @field_validator("tokens")
    @classmethod
    def _unique_token_names(cls, tokens: list[TokenSettings]) -> list[TokenSettings]:
        seen: set[str] = set()
        for token in tokens:
            if token.name in seen:
                raise ValueError(f"name {token.name!r} is used twice")
            seen.add(token.name)
        return tokens


def _field_path(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def parse_settings(data: object, source: str = "config") -> Settings:
    try:
        return Settings.model_validate(data if data is not None else {})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ConfigError(f"{source}: {_field_path(tuple(error['loc']))}: {error['msg']}") from None


def _check_tls(tls: TlsSettings) -> None:
    try:
        ssl.create_default_context(cafile=str(tls.cert))
    except ssl.SSLError:
        raise ConfigError(f"tls.cert: {tls.cert}: not a PEM certificate") from None
    except OSError as exc:
        raise ConfigError(f"tls.cert: {tls.cert}: cannot read: {exc.strerror}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(f"tls.key: {tls.key}: does not match tls.cert {tls.cert}") from None
        raise ConfigError(f"tls.key: {tls.key}: not a PEM private key") from None
    except OSError as exc:
        raise ConfigError(f"tls.key: {tls.key}: cannot read: {exc.strerror}") from None


def _check_sqlite_path(path: Path) -> None:
    where = f"store.path: {path}"
    if path.is_dir():
        raise ConfigError(f"{where}: is a directory, expected a database file")
    if not path.exists():
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise ConfigError(f"{where}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"{where}: directory {parent} is not writable")
        return
    if not os.access(path, os.R_OK | os.W_OK):
        raise ConfigError(f"{where}: not readable and writable by this user")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            db.execute("PRAGMA schema_version").fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise ConfigError(f"{where}: not a usable SQLite database ({exc})") from None


def check_files(settings: Settings, source: str = "config") -> None:
    """What the schema cannot see: TLS files that load and match, a usable SQLite path."""
    try:
        if settings.tls is not None:
            _check_tls(settings.tls)
        if isinstance(settings.store, SqliteStoreSettings):
            _check_sqlite_path(settings.store.path)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_settings(path: Path) -> Settings:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML") from None
    return parse_settings(data, str(path))
