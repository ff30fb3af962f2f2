"""A CustomResourceDefinition's own checks, run as the API server runs them on a create or an update:
schema defaults applied, the openAPIV3Schema (strict: an unknown field is an error, since the server
would prune it silently) and every `x-kubernetes-validations` CEL rule, evaluated with cel-python at
the schema node where it is declared (the object walked beside its schema, list items included).

Transition rules (those that read `oldSelf`) run only on an update, and only where the old object has
a value at the same place: for items of a `listType: map` list, the old item with the same map keys;
items of other lists have none. Shared by the manifest tests and `make lint-k8s`.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from fake_cluster import strict_schema

_OLD_SELF = re.compile(r"\boldSelf\b")


@dataclass(frozen=True)
class Rule:
    path: str                  # where the rule is declared, e.g. spec.runtimePatches[].manager
    rule: str
    message: str

    @property
    def transition(self) -> bool:
        return bool(_OLD_SELF.search(self.rule))


@dataclass
class CrdCheck:
    """The checks of one version of a CRD; `evaluated` collects the rules that have run."""

    schema: dict[str, Any]
    kind: str
    rules: list[Rule] = field(default_factory=list)
    evaluated: set[Rule] = field(default_factory=set)
    _validator: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, path: Path, version: str | None = None) -> "CrdCheck":
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        versions = crd["spec"]["versions"]
        chosen = next(v for v in versions if v["name"] == version) if version else \
            next(v for v in versions if v.get("storage"))
        check = cls(chosen["schema"]["openAPIV3Schema"], crd["spec"]["names"]["kind"])
        check.rules = list(_rules(check.schema, ""))
        return check

    # ---------------------------------------------------------------- the three checks

    def defaulted(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The object as stored: every absent field with a schema default, inside present objects, set."""
        out = copy.deepcopy(obj)
        _default(self.schema, out)
        return out

    def schema_errors(self, obj: dict[str, Any]) -> list[str]:
        if self._validator is None:
            import jsonschema

            self._validator = jsonschema.Draft7Validator(strict_schema(self.schema))
        return [f"{_dotted(e.absolute_path)}: {e.message}" for e in self._validator.iter_errors(obj)]

    def cel_errors(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
        """Every rule that fails (or cannot be evaluated), as '<path>: <message> (rule: ...)'."""
        errors: list[str] = []
        self._walk(self.schema, obj, old, "", "", errors)
        return errors

    def errors(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
        """What the API server would say to creating `obj` (or to updating `old` to it), named after the object."""
        new = self.defaulted(obj)
        name = f"{self.kind} {(obj.get('metadata') or {}).get('name', '?')}"
        found = self.schema_errors(new) + self.cel_errors(new, self.defaulted(old) if old is not None else None)
        return [f"{name}: {e}" for e in found]

    # ---------------------------------------------------------------- the walk

    def _walk(self, schema: dict[str, Any], value: Any, old: Any, path: str, where: str, errors: list[str]) -> None:
        for raw in schema.get("x-kubernetes-validations", []):
            rule = Rule(path, raw["rule"], raw.get("message", ""))
            if rule.transition and old is None:
                continue  # a create, or nothing to correlate with
            self.evaluated.add(rule)
            failure = _evaluate(rule.rule, value, old)
            if failure is not None:
                errors.append(f"{where or '(root)'}: {rule.message or 'failed'} (rule: {rule.rule}){failure}")
        if isinstance(value, dict):
            props = schema.get("properties") or {}
            extra = schema.get("additionalProperties")
            for key, item in value.items():
                sub = props.get(key) or (extra if isinstance(extra, dict) else None)
                if sub is not None:
                    before = old.get(key) if isinstance(old, dict) else None
                    self._walk(sub, item, before, f"{path}.{key}" if key in props else f"{path}{{}}",
                               f"{where}.{key}".lstrip("."), errors)
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            keys = schema.get("x-kubernetes-list-map-keys") if schema.get("x-kubernetes-list-type") == "map" else None
            for i, item in enumerate(value):
                before = _correlate(item, old, keys)
                self._walk(schema["items"], item, before, f"{path}[]", f"{where}[{i}]", errors)


def _rules(schema: dict[str, Any], path: str):
    for raw in schema.get("x-kubernetes-validations", []):
        yield Rule(path, raw["rule"], raw.get("message", ""))
    for key, sub in (schema.get("properties") or {}).items():
        yield from _rules(sub, f"{path}.{key}")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _rules(schema["additionalProperties"], f"{path}{{}}")
    if isinstance(schema.get("items"), dict):
        yield from _rules(schema["items"], f"{path}[]")


def _correlate(item: Any, old: Any, keys: list[str] | None) -> Any:
    """The old list's item with the same map keys (listType map only)."""
    if not keys or not isinstance(old, list) or not isinstance(item, dict):
        return None
    want = [item.get(k) for k in keys]
    return next((o for o in old if isinstance(o, dict) and [o.get(k) for k in keys] == want), None)


def _default(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key) or (extra if isinstance(extra, dict) else None)
            if sub is not None:
                _default(sub, item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default(schema["items"], item)


def _dotted(path) -> str:
    return ".".join(map(str, path)) or "(root)"


@functools.lru_cache(maxsize=None)
def _program(rule: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def _evaluate(rule: str, value: Any, old: Any) -> str | None:
    """None when the rule holds; else '' (it is false) or why it could not be evaluated."""
    import celpy

    activation = {"self": celpy.json_to_cel(value)}
    if old is not None:
        activation["oldSelf"] = celpy.json_to_cel(old)
    try:
        result = _program(rule).evaluate(activation)
    except celpy.CELEvalError as e:
        return f"; cannot be evaluated: {e}"
    if isinstance(result, celpy.CELEvalError):
        return f"; cannot be evaluated: {result}"
    if not isinstance(result, celpy.celtypes.BoolType):
        return f"; evaluated to {result!r}, not a bool"
    return None if result else ""
