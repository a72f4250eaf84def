"""A family described in one file (`--models-file family.toml` or `.yaml`):

    [base]                      # the family's root (optional: the default model)
    name = "base"
    path = "/models/base"

    [models]                    # full fine-tunes of the base
    coder = "/models/base-coder"
    writer = { path = "/models/base-writer" }

    [lora]                      # PEFT LoRA adapters on the base
    coder-lora = "/models/coder-lora"

    [remote]                    # members served by other engines: their stored KV is reused
    writer-2 = "3f9a...c2"      # the fingerprint their /model_info reports

Relative paths are relative to the file. Entries from flags (`--model`,
`--lora-paths`) are added after the file's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from droidspeak.errors import InvalidRequestError

SECTIONS = ("base", "models", "lora", "remote")


@dataclass(frozen=True)
class FamilyFile:
    base_path: str | None
    base_name: str | None
    models: tuple[str, ...]   # NAME=PATH
    lora: tuple[str, ...]
    remote: tuple[str, ...] = ()  # NAME=FINGERPRINT


def _fail(path: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"models file {path}: {message}", "models_file")


def _read(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise _fail(path, f"cannot read it ({e.strerror})") from None
    try:
        if path.endswith(".toml"):
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            return tomllib.loads(data.decode("utf-8"))
        if path.endswith((".yaml", ".yml")):
            import yaml
            loaded = yaml.safe_load(data)
            return {} if loaded is None else loaded
    except Exception as e:  # a syntax error of either format
        raise _fail(path, f"not valid {'TOML' if path.endswith('.toml') else 'YAML'}: {e}") from None
    raise _fail(path, "must end in .toml, .yaml or .yml")


def _resolve(path: str, where: str, value) -> str:
    if isinstance(value, dict):
        extra = set(value) - {"path"}
        if extra or "path" not in value:
            raise _fail(path, f"{where} must be a path or {{path = ...}}, got keys {sorted(value)}")
        value = value["path"]
    if not isinstance(value, str) or not value:
        raise _fail(path, f"{where} must be a non-empty path string, got {value!r}")
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(os.path.dirname(path), value))


def load_models_file(path: str) -> FamilyFile:
    data = _read(path)
    if not isinstance(data, dict):
        raise _fail(path, "the top level must be a table/mapping")
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise _fail(path, f"unknown section(s) {sorted(unknown)}; sections: {list(SECTIONS)}")
    base = data.get("base", {})
    if not isinstance(base, dict) or set(base) - {"name", "path"}:
        raise _fail(path, "[base] takes only name and path")
    name = base.get("name")
    if name is not None and (not isinstance(name, str) or not name or "=" in name):
        raise _fail(path, f"base name must be a non-empty string without '=', got {name!r}")
    entries = {}
    for section in ("models", "lora"):
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise _fail(path, f"[{section}] must map model names to paths")
        out = []
        for model, value in table.items():
            if not isinstance(model, str) or not model or "=" in model:
                raise _fail(path, f"bad model name {model!r} in [{section}]")
            out.append(f"{model}={_resolve(path, f'[{section}] {model}', value)}")
        entries[section] = tuple(out)
    remote = data.get("remote", {})
    if not isinstance(remote, dict):
        raise _fail(path, "[remote] must map model names to fingerprints")
    for model, value in remote.items():
        if not isinstance(model, str) or not model or "=" in model or not isinstance(value, str) or not value:
            raise _fail(path, f"[remote] entries are name = \"fingerprint\", got {model!r} = {value!r}")
    base_path = _resolve(path, "[base] path", base["path"]) if "path" in base else None
    return FamilyFile(base_path, name, entries["models"], entries["lora"],
                      tuple(f"{model}={value}" for model, value in remote.items()))
