"""SAM / CloudFormation templates into FunctionConfig: resolve what lambdabox uses, merge Globals, find code
and layers on disk, and refuse (TemplateError) whatever Lambda would refuse or lambdabox cannot run locally.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, NoReturn

from lambdabox.core.errors import TemplateError
from lambdabox.core.model import DEFAULT_ACCOUNT_ID, DEFAULT_REGION, EventInvokeConfig, FunctionConfig, LayerConfig
from lambdabox.template.document import read_document, read_section
from lambdabox.template.eventconfig import EVENT_INVOKE_CONFIG, read_event_invoke
from lambdabox.template.intrinsic import NO_VALUE, Resolver, Unresolvable
from lambdabox.template.properties import (
    DEFAULT_EPHEMERAL_STORAGE_MB,
    DEFAULT_MEMORY_MB,
    DEFAULT_TIMEOUT_S,
    EPHEMERAL_STORAGE_RANGE,
    MEMORY_RANGE,
    TIMEOUT_RANGE,
    check_layer_count,
    read_environment,
    read_function_name,
    read_handler,
    read_runtime,
    read_whole,
)

SERVERLESS_FUNCTION: Final = "AWS::Serverless::Function"
LAMBDA_FUNCTION: Final = "AWS::Lambda::Function"
FUNCTION_TYPES: Final = {SERVERLESS_FUNCTION: "CodeUri", LAMBDA_FUNCTION: "Code"}
LAYER_TYPES: Final = {"AWS::Serverless::LayerVersion": "ContentUri", "AWS::Lambda::LayerVersion": "Content"}

_MISSING: Final = object()


@dataclass(frozen=True)
class Template:
    """A loaded template: its functions by logical id, in template order."""

    source: Path
    functions: Mapping[str, FunctionConfig] = field(default_factory=dict)

    def function(self, name: str | None) -> FunctionConfig:
        """The function with this logical id, else this FunctionName; None means the only function."""
        if name is None:
            if len(self.functions) == 1:
                return next(iter(self.functions.values()))
            ids = ", ".join(self.functions)
            rule = f"has several functions; choose one of {ids}" if ids else "has no functions"
            raise TemplateError(str(self.source), None, rule)
        if name in self.functions:
            return self.functions[name]
        for config in self.functions.values():
            if config.function_name == name:
                return config
        names = ", ".join(f"{c.logical_id} ({c.function_name})" for c in self.functions.values())
        raise TemplateError(str(self.source), None, f"no function {name!r}; choose one of {names or 'none'}")


def load_template(path: Path, parameter_overrides: Mapping[str, str] | None = None) -> Template:
    """Read a SAM or CloudFormation template (YAML or JSON) and build every function in it."""
    source = Path(path).absolute()
    return _Loader(source, read_document(source), dict(parameter_overrides or {})).load()


class _Loader:
    """One pass over one template; resolves lazily so that only the properties used must resolve."""

    def __init__(self, source: Path, document: dict[str, Any], overrides: dict[str, str]) -> None:
        self.source = source
        self.where = str(source)
        self.base = source.parent
        self.parameters = read_section(document, self.where, "Parameters")
        self.overrides = overrides
        self.resources: dict[str, Any] = document["Resources"]
        globals_ = read_section(document, self.where, "Globals")
        self.globals = globals_.get("Function") or {}
        if not isinstance(self.globals, dict):
            raise TemplateError(self.where, "Globals", "Globals.Function must be a mapping")
        self.resolver = Resolver(
            ref=self._ref,
            get_att=self._get_att,
            mappings=read_section(document, self.where, "Mappings"),
            conditions=read_section(document, self.where, "Conditions"),
        )
        self.layers: dict[str, LayerConfig] = {}
        self.names: dict[str, str | None] = {}  # logical id -> FunctionName (None while resolving)

    # --- references ---------------------------------------------------------------------------------

    def _ref(self, name: str) -> Any:
        if name in self.parameters:
            return self._parameter(name)
        kind = self._kind(name)
        if kind in LAYER_TYPES:
            return self._layer(name)
        if kind in FUNCTION_TYPES:
            return self._function_name(name)
        if kind is None:
            raise Unresolvable(f"Ref {name}: no parameter or resource of that name")
        raise Unresolvable(f"Ref {name}: a {kind} resource has no local value")

    def _get_att(self, resource: str, attribute: str) -> str:
        kind = self._kind(resource)
        if kind in FUNCTION_TYPES and attribute == "Arn":
            name = self._function_name(resource)
            return f"arn:aws:lambda:{DEFAULT_REGION}:{DEFAULT_ACCOUNT_ID}:function:{name}"
        raise Unresolvable(f"Fn::GetAtt {resource}.{attribute}: has no local value")

    def _kind(self, logical_id: str) -> str | None:
        resource = self.resources.get(logical_id)
        if not isinstance(resource, dict):
            return None
        if not self._enabled(logical_id):
            raise Unresolvable(f"resource {logical_id} is not created (its Condition is false)")
        kind = resource.get("Type")
        return kind if isinstance(kind, str) else "untyped"

    def _parameter(self, name: str) -> Any:
        declared = self.parameters[name]
        if not isinstance(declared, dict):
            raise Unresolvable(f"parameter {name} must be a mapping")
        if name in self.overrides:
            value = self.overrides[name]
        elif "Default" in declared:
            value = declared["Default"]
            value = ",".join(map(_text, value)) if isinstance(value, list) else _text(value)
        else:
            raise Unresolvable(f"parameter {name} has no Default and no override was given")
        allowed = declared.get("AllowedValues")
        if isinstance(allowed, list) and value not in [_text(a) for a in allowed]:
            raise Unresolvable(f"parameter {name}: {value!r} is not one of its AllowedValues")
        kind = str(declared.get("Type", "String"))
        if kind == "CommaDelimitedList" or kind.startswith("List<"):
            return [item.strip() for item in value.split(",")]
        return value

    def _enabled(self, logical_id: str) -> bool:
        condition = self.resources[logical_id].get("Condition")
        if condition is None:
            return True
        try:
            return self.resolver.condition(condition)
        except Unresolvable as exc:
            raise TemplateError(self.where, logical_id, f"Condition: {exc.rule}") from None

    def _resolve(self, resource: str, prop: str, value: Any) -> Any:
        try:
            return self.resolver.resolve(value)
        except Unresolvable as exc:
            raise TemplateError(self.where, resource, f"{prop}: {exc.rule}") from None

    def _properties(self, logical_id: str) -> dict[str, Any]:
        properties = self.resources[logical_id].get("Properties") or {}
        if not isinstance(properties, dict):
            raise TemplateError(self.where, logical_id, "Properties must be a mapping")
        return properties

    def _function_name(self, logical_id: str) -> str:
        if logical_id in self.names:
            name = self.names[logical_id]
            if name is None:
                raise Unresolvable(f"the FunctionName of {logical_id} refers to itself")
            return name
        self.names[logical_id] = None
        raw = self._properties(logical_id).get("FunctionName", _MISSING)
        value = logical_id if raw is _MISSING else self._resolve(logical_id, "FunctionName", raw)
        if value is NO_VALUE:
            value = logical_id
        value = read_function_name(value, _Fail(self.where, logical_id))
        self.names[logical_id] = value
        return value

    # --- paths and layers ---------------------------------------------------------------------------

    def _local_path(self, resource: str, prop: str, value: Any) -> Path:
        if not isinstance(value, str) or not value or value.startswith(("s3://", "arn:", "http")):
            rule = f"{prop} must be a local directory or .zip path, not {value!r} (run `sam build` first?)"
            raise TemplateError(self.where, resource, rule)
        path = (self.base / value).resolve()
        if not path.exists():
            raise TemplateError(self.where, resource, f"{prop} path {value!r} does not exist ({path})")
        if not path.is_dir() and path.suffix.lower() != ".zip":
            raise TemplateError(self.where, resource, f"{prop} {value!r} must be a directory or a .zip file")
        return path

    def _layer(self, logical_id: str) -> LayerConfig:
        if logical_id not in self.layers:
            kind = self.resources[logical_id]["Type"]
            prop = LAYER_TYPES[kind]
            raw = self._properties(logical_id).get(prop, _MISSING)
            if raw is _MISSING:
                raise TemplateError(self.where, logical_id, f"{kind} needs {prop}")
            path = self._local_path(logical_id, prop, self._resolve(logical_id, prop, raw))
            self.layers[logical_id] = LayerConfig(name=logical_id, content=path)
        return self.layers[logical_id]

    # --- functions ----------------------------------------------------------------------------------

    def load(self) -> Template:
        functions: dict[str, FunctionConfig] = {}
        for logical_id, resource in self.resources.items():
            if not isinstance(resource, dict):
                raise TemplateError(self.where, logical_id, "a resource must be a mapping")
            if resource.get("Type") in FUNCTION_TYPES and self._enabled(logical_id):
                functions[logical_id] = self._function(logical_id)
        owners: dict[str, str] = {}
        for logical_id, config in functions.items():
            other = owners.setdefault(config.function_name, logical_id)
            if other != logical_id:
                rule = f"FunctionName {config.function_name!r} is already used by {other}"
                raise TemplateError(self.where, logical_id, rule)
        for logical_id, resource in self.resources.items():
            if resource.get("Type") == EVENT_INVOKE_CONFIG and self._enabled(logical_id):
                fail = _Fail(self.where, logical_id)
                props = self._properties(logical_id)
                name = self._resolve(logical_id, "FunctionName", props.get("FunctionName"))
                found = [c for c in functions.values() if name in (c.function_name, c.arn)]
                if not found:
                    fail(f"FunctionName {name!r} is not a function of this template")
                config = replace(found[0], event_invoke=self._event_invoke(logical_id, props, fail, ""))
                functions[config.logical_id] = config
        return Template(source=self.source, functions=functions)

    def _get(self, logical_id: str, prop: str) -> Any:
        """A property resolved, merged over Globals.Function for SAM functions; _MISSING if absent."""
        props = self._properties(logical_id)
        own = self._resolve(logical_id, prop, props[prop]) if prop in props else _MISSING
        shared: Any = _MISSING
        if self.resources[logical_id]["Type"] == SERVERLESS_FUNCTION and prop in self.globals:
            shared = self._resolve("Globals.Function", prop, self.globals[prop])
        own = _MISSING if own is NO_VALUE else own
        shared = _MISSING if shared is NO_VALUE else shared
        return shared if own is _MISSING else own if shared is _MISSING else _merge(shared, own)

    def _raw(self, logical_id: str, prop: str) -> Any:
        """A property as written (unresolved), merged over Globals.Function for SAM functions; _MISSING if absent."""
        own = self._properties(logical_id).get(prop, _MISSING)
        shared = _MISSING
        if self.resources[logical_id]["Type"] == SERVERLESS_FUNCTION:
            shared = self.globals.get(prop, _MISSING)
        return shared if own is _MISSING else own if shared is _MISSING else _merge(shared, own)

    def _function(self, logical_id: str) -> FunctionConfig:
        fail = _Fail(self.where, logical_id)
        kind = self.resources[logical_id]["Type"]
        package = self._get(logical_id, "PackageType")
        if package == "Image" or self._get(logical_id, "ImageUri") is not _MISSING:
            fail("PackageType Image (container image functions) is not supported; use a Zip package")
        if self._get(logical_id, "InlineCode") is not _MISSING:
            fail("InlineCode is not supported; put the code in a directory and point CodeUri at it")
        code_prop = FUNCTION_TYPES[kind]
        code_value = self._get(logical_id, code_prop)
        if code_value is _MISSING:
            if kind == LAMBDA_FUNCTION:
                fail("Code must be a local path (as `sam build` writes it)")
            code_value = "."  # as `sam local` does
        code = self._local_path(logical_id, code_prop, code_value)

        runtime = self._get(logical_id, "Runtime")
        if runtime is _MISSING:
            fail("Runtime is missing (set it on the function or in Globals.Function)")
        runtime = read_runtime(runtime, fail)
        handler = self._get(logical_id, "Handler")
        handler = read_handler("" if handler is _MISSING else handler, runtime, fail)

        timeout, memory = DEFAULT_TIMEOUT_S, DEFAULT_MEMORY_MB
        if (value := self._get(logical_id, "Timeout")) is not _MISSING:
            timeout = read_whole(fail, value, "Timeout", *TIMEOUT_RANGE)
        if (value := self._get(logical_id, "MemorySize")) is not _MISSING:
            memory = read_whole(fail, value, "MemorySize", *MEMORY_RANGE)
        storage = DEFAULT_EPHEMERAL_STORAGE_MB
        if (value := self._get(logical_id, "EphemeralStorage")) is not _MISSING:
            size = value.get("Size") if isinstance(value, dict) else None
            storage = read_whole(fail, size, "EphemeralStorage.Size", *EPHEMERAL_STORAGE_RANGE)
        reserved = provisioned = None
        if (value := self._get(logical_id, "ReservedConcurrentExecutions")) is not _MISSING:
            reserved = read_whole(fail, value, "ReservedConcurrentExecutions")
        if (value := self._get(logical_id, "ProvisionedConcurrencyConfig")) is not _MISSING:
            count = value.get("ProvisionedConcurrentExecutions") if isinstance(value, dict) else None
            provisioned = read_whole(fail, count, "ProvisionedConcurrencyConfig.ProvisionedConcurrentExecutions")
        event_invoke = EventInvokeConfig()
        if (value := self._raw(logical_id, "EventInvokeConfig")) is not _MISSING:
            if not isinstance(value, dict):
                fail("EventInvokeConfig must be a mapping")
            event_invoke = self._event_invoke(logical_id, value, fail, "EventInvokeConfig.")
        return FunctionConfig(
            logical_id=logical_id,
            function_name=self._function_name(logical_id),
            runtime=runtime,
            handler=handler,
            code=code,
            layers=self._function_layers(logical_id, fail),
            environment=self._environment(logical_id, fail),
            timeout_s=float(timeout),
            memory_mb=memory,
            ephemeral_storage_mb=storage,
            template=self.source,
            reserved_concurrency=reserved,
            provisioned_concurrency=provisioned,
            event_invoke=event_invoke,
        )

    def _event_invoke(self, resource: str, value: dict[str, Any], fail: _Fail, where: str) -> EventInvokeConfig:
        return read_event_invoke(
            resource, value, self.resources, lambda prop, raw: self._resolve(resource, where + prop, raw), fail, where
        )

    def _function_layers(self, logical_id: str, fail: _Fail) -> tuple[LayerConfig, ...]:
        value = self._get(logical_id, "Layers")
        if value is _MISSING:
            return ()
        if not isinstance(value, list):
            fail("Layers must be a list")
        layers: list[LayerConfig] = []
        for item in value:
            if isinstance(item, LayerConfig):
                layers.append(item)
            elif isinstance(item, str) and item.startswith("arn:"):
                fail(f"Layers: {item} is a remote layer ARN; lambdabox needs the layer on disk")
            else:
                path = self._local_path(logical_id, "Layers", item)
                layers.append(LayerConfig(name=path.name, content=path))
        check_layer_count(len(layers), fail)
        return tuple(layers)

    def _environment(self, logical_id: str, fail: _Fail) -> dict[str, str]:
        value = self._get(logical_id, "Environment")
        return {} if value is _MISSING else read_environment(value, fail)


class _Fail:
    """Raises a TemplateError about one resource; typed NoReturn so checks narrow."""

    def __init__(self, source: str, resource: str) -> None:
        self.source = source
        self.resource = resource

    def __call__(self, rule: str) -> NoReturn:
        raise TemplateError(self.source, self.resource, rule)


def _text(value: Any) -> str:
    return "true" if value is True else "false" if value is False else str(value)


def _merge(shared: Any, own: Any) -> Any:
    """SAM's Globals merge: mappings key by key, lists shared-first, anything else: the resource wins."""
    if isinstance(shared, dict) and isinstance(own, dict):
        merged = dict(shared)
        for key, value in own.items():
            merged[key] = _merge(merged[key], value) if key in merged else value
        return merged
    if isinstance(shared, list) and isinstance(own, list):
        return shared + own
    return own
