"""Named contexts, in the manner of kubectl's: which API (URLs, token, CA) edgectl talks to
when no flag or environment variable says so. `make lab` writes a `lab` context and makes it
current, so `edgectl status` works with no flags right after it.

The file is `$EDGECTL_CONFIG`, else `$XDG_CONFIG_HOME/edgectl/config.yaml`, else
`~/.config/edgectl/config.yaml`; written with mode 0600 (it holds tokens). A file that does
not parse is one line naming the file and the field, never a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ContextName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]


class Context(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    api: list[Annotated[str, Field(pattern=r"^https?://\S+$", max_length=2000)]] = Field(
        min_length=1, max_length=16
    )
    token: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    ca_file: str | None = None


class ContextFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    current: ContextName | None = None
    contexts: dict[ContextName, Context] = Field(default_factory=dict)


class ContextError(Exception):
    """The context file is unusable: the message is the one line to show."""


def config_path() -> Path:
    explicit = os.environ.get("EDGECTL_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgectl" / "config.yaml"


def load(path: Path | None = None) -> ContextFile:
    path = path or config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return ContextFile()
    except OSError as error:
        raise ContextError(f"{path}: cannot read: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ContextError(f"{path}: not valid YAML{where}") from None
    try:
        config = ContextFile.model_validate(data or {})
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ContextError(f"{path}: {field}: {first['msg']}") from None
    if config.current is not None and config.current not in config.contexts:
        raise ContextError(f"{path}: current: no context named {config.current!r}")
    return config


def save(config: ContextFile, path: Path | None = None) -> Path:
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    temporary.replace(path)
    return path


def current(path: Path | None = None) -> tuple[str, Context] | None:
    config = load(path)
    if config.current is None:
        return None
    return config.current, config.contexts[config.current]


def put(name: str, context: Context, *, make_current: bool, path: Path | None = None) -> Path:
    config = load(path)
    contexts = {**config.contexts, name: context}
    new = ContextFile(current=name if make_current else config.current, contexts=contexts)
    return save(ContextFile.model_validate(new.model_dump()), path)


def use(name: str, path: Path | None = None) -> Path:
    config = load(path)
    if name not in config.contexts:
        known = ", ".join(sorted(config.contexts)) or "none"
        raise ContextError(f"no context named {name!r} (known: {known})")
    return save(config.model_copy(update={"current": name}), path)
