"""CloudFormation intrinsics: a YAML loader for the short forms (``!Ref``, ``!Sub`` ...) and a resolver
that evaluates the long forms against one template's parameters, mappings, conditions and resources.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import yaml

from lambdabox.core.model import DEFAULT_ACCOUNT_ID, DEFAULT_REGION

STACK_NAME: Final = "lambdabox"

PSEUDO_PARAMETERS: Final[Mapping[str, str]] = {
    "AWS::Region": DEFAULT_REGION,
    "AWS::AccountId": DEFAULT_ACCOUNT_ID,
    "AWS::StackName": STACK_NAME,
    "AWS::StackId": (
        f"arn:aws:cloudformation:{DEFAULT_REGION}:{DEFAULT_ACCOUNT_ID}:stack/{STACK_NAME}"
        "/00000000-0000-0000-0000-000000000000"
    ),
    "AWS::Partition": "aws",
    "AWS::URLSuffix": "amazonaws.com",
}

SHORT_FORMS: Final = (
    "Ref", "Condition", "Sub", "GetAtt", "Join", "Select", "Split", "If", "Equals", "Not", "And", "Or",
    "FindInMap", "Base64", "Cidr", "GetAZs", "ImportValue", "Transform", "Length", "ToJsonString",
)  # fmt: skip


class _NoValue:
    def __repr__(self) -> str:
        return "AWS::NoValue"


NO_VALUE: Final = _NoValue()
"""What ``Ref: AWS::NoValue`` resolves to; mappings drop the key, lists drop the item."""


class Unresolvable(Exception):
    """An intrinsic lambdabox cannot (or may not) evaluate; ``rule`` says which and why."""

    def __init__(self, rule: str) -> None:
        super().__init__(rule)
        self.rule = rule


# --- YAML -----------------------------------------------------------------------------------------


class CfnLoader(yaml.SafeLoader):
    """SafeLoader with every CloudFormation short form, string keys, no implicit dates, no duplicate keys."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE:
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )  # fmt: skip
                seen.add(key_node.value)
        node.value = [(_string_key(key), value) for key, value in node.value]
        return super().construct_mapping(node, deep=deep)


_MERGE: Final = "tag:yaml.org,2002:merge"
_NOT_STRINGS: Final = {f"tag:yaml.org,2002:{kind}" for kind in ("bool", "int", "float", "null")}


def _string_key(node: yaml.Node) -> yaml.Node:
    """Keys are names in CloudFormation: ``Off:`` or ``123456789012:`` stay strings, as written."""
    if isinstance(node, yaml.ScalarNode) and node.tag in _NOT_STRINGS:
        return yaml.ScalarNode("tag:yaml.org,2002:str", node.value, node.start_mark, node.end_mark, node.style)
    return node


def _short_form(name: str) -> Callable[[CfnLoader, yaml.Node], dict[str, Any]]:
    long_name = name if name in ("Ref", "Condition") else f"Fn::{name}"

    def construct(loader: CfnLoader, node: yaml.Node) -> dict[str, Any]:
        value: Any
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
            if name == "GetAtt" and isinstance(value, str):
                value = value.split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            assert isinstance(node, yaml.MappingNode)
            value = loader.construct_mapping(node, deep=True)
        return {long_name: value}

    return construct


for _name in SHORT_FORMS:
    CfnLoader.add_constructor(f"!{_name}", _short_form(_name))


def load_yaml(text: str) -> Any:
    """Parse YAML (or JSON) with the short forms turned into their long forms."""
    return yaml.load(text, Loader=CfnLoader)  # a SafeLoader subclass


# --- resolution -----------------------------------------------------------------------------------

_SUB_VAR = re.compile(r"\$\{([^}]*)\}")


def is_intrinsic(value: Any) -> bool:
    """``{"Ref": ...}`` or ``{"Fn::X": ...}``: a one-key mapping naming an intrinsic function."""
    if not isinstance(value, dict) or len(value) != 1:
        return False
    key = next(iter(value))
    return isinstance(key, str) and (key == "Ref" or key.startswith("Fn::"))


def scalar_text(value: Any, what: str) -> str:
    """A resolved scalar as CloudFormation renders it into a string (booleans as ``true``/``false``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise Unresolvable(f"{what} must be a string, not {_describe(value)}")


def _describe(value: Any) -> str:
    if is_intrinsic(value):
        return f"an unresolved {next(iter(value))}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__ if value is not None else "null"


def _args(fn: str, value: Any, count: int | tuple[int, int]) -> list[Any]:
    low, high = (count, count) if isinstance(count, int) else count
    if not isinstance(value, list) or not low <= len(value) <= high:
        n = str(low) if low == high else f"{low} to {high}"
        raise Unresolvable(f"{fn} takes a list of {n} arguments")
    return value


def _index(value: Any, fn: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise Unresolvable(f"{fn}: {value!r} is not a number")


@dataclass
class Resolver:
    """Evaluates intrinsics. ``ref`` answers ``Ref`` to anything but a pseudo parameter (parameters,
    resources), ``get_att`` answers ``Fn::GetAtt``; both raise Unresolvable when they cannot.
    """

    ref: Callable[[str], Any]
    get_att: Callable[[str, str], Any]
    mappings: Mapping[str, Any] = field(default_factory=dict)
    conditions: Mapping[str, Any] = field(default_factory=dict)
    _decided: dict[str, bool] = field(default_factory=dict)
    _deciding: set[str] = field(default_factory=set)

    def resolve(self, value: Any) -> Any:
        """``value`` with every intrinsic in it evaluated; NO_VALUE items and keys are dropped."""
        if isinstance(value, list):
            items = [self.resolve(item) for item in value]
            return [item for item in items if item is not NO_VALUE]
        if not isinstance(value, dict):
            return value
        if is_intrinsic(value):
            ((fn, arg),) = value.items()
            return self._call(fn, arg)
        resolved = {key: self.resolve(item) for key, item in value.items()}
        return {key: item for key, item in resolved.items() if item is not NO_VALUE}

    def condition(self, name: Any) -> bool:
        """The value of the named entry of Conditions."""
        if not isinstance(name, str) or name not in self.conditions:
            raise Unresolvable(f"Condition {name!r} is not defined in Conditions")
        if name not in self._decided:
            if name in self._deciding:
                raise Unresolvable(f"Condition {name!r} depends on itself")
            self._deciding.add(name)
            try:
                self._decided[name] = self._truth(self.conditions[name], f"Condition {name!r}")
            finally:
                self._deciding.discard(name)
        return self._decided[name]

    def _truth(self, value: Any, what: str) -> bool:
        if isinstance(value, dict) and list(value) == ["Condition"]:
            return self.condition(value["Condition"])
        result = self.resolve(value)
        if isinstance(result, str) and result.lower() in ("true", "false"):
            return result.lower() == "true"
        if not isinstance(result, bool):
            raise Unresolvable(f"{what} must be a condition, not {_describe(result)}")
        return result

    def _call(self, fn: str, arg: Any) -> Any:
        if fn == "Ref":
            return self._ref(self.resolve(arg))
        handler = getattr(self, "_fn_" + fn.removeprefix("Fn::").lower(), None)
        if handler is None:
            raise Unresolvable(f"{fn} is not an intrinsic function lambdabox knows")
        return handler(arg)

    def _ref(self, name: Any) -> Any:
        if not isinstance(name, str):
            raise Unresolvable(f"Ref takes a name, not {_describe(name)}")
        if name == "AWS::NoValue":
            return NO_VALUE
        if name in PSEUDO_PARAMETERS:
            return PSEUDO_PARAMETERS[name]
        if name.startswith("AWS::"):
            raise Unresolvable(f"Ref {name}: this pseudo parameter has no local value")
        return self.ref(name)

    def _fn_getatt(self, arg: Any) -> Any:
        arg = self.resolve(arg)
        if isinstance(arg, str):
            arg = arg.split(".", 1)
        resource, attribute = _args("Fn::GetAtt", arg, 2)
        if not isinstance(resource, str) or not isinstance(attribute, str):
            raise Unresolvable("Fn::GetAtt takes a resource name and an attribute name")
        return self.get_att(resource, attribute)

    def _fn_sub(self, arg: Any) -> str:
        variables: dict[str, Any] = {}
        if isinstance(arg, list):
            text, raw_vars = _args("Fn::Sub", arg, 2)
            if not isinstance(raw_vars, dict):
                raise Unresolvable("Fn::Sub: the second argument must be a mapping of variables")
            variables = {key: self.resolve(item) for key, item in raw_vars.items()}
        else:
            text = arg
        if not isinstance(text, str):
            raise Unresolvable(f"Fn::Sub takes a string, not {_describe(text)}")

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1).strip()
            if name.startswith("!"):
                return "${" + match.group(1)[1:] + "}"
            if name in variables:
                value = variables[name]
            elif "." in name and not name.startswith("AWS::"):
                value = self.get_att(*name.split(".", 1))
            else:
                value = self._ref(name)
            return scalar_text(value, f"Fn::Sub: ${{{name}}}")

        return _SUB_VAR.sub(substitute, text)

    def _fn_join(self, arg: Any) -> str:
        delimiter, items = _args("Fn::Join", self.resolve(arg), 2)
        if not isinstance(delimiter, str) or not isinstance(items, list):
            raise Unresolvable("Fn::Join takes a delimiter string and a list")
        return delimiter.join(scalar_text(item, "Fn::Join: an item") for item in items)

    def _fn_select(self, arg: Any) -> Any:
        index, items = _args("Fn::Select", self.resolve(arg), 2)
        position = _index(index, "Fn::Select")
        if not isinstance(items, list):
            raise Unresolvable(f"Fn::Select takes a list, not {_describe(items)}")
        if position >= len(items):
            raise Unresolvable(f"Fn::Select: index {position} is past the end of a list of {len(items)}")
        return items[position]

    def _fn_split(self, arg: Any) -> list[str]:
        delimiter, text = _args("Fn::Split", self.resolve(arg), 2)
        if not isinstance(delimiter, str) or not delimiter or not isinstance(text, str):
            raise Unresolvable("Fn::Split takes a delimiter and a string")
        return text.split(delimiter)

    def _fn_findinmap(self, arg: Any) -> Any:
        args = _args("Fn::FindInMap", arg, (3, 4))
        default = args[3] if len(args) == 4 else None
        name, top, second = (scalar_text(self.resolve(a), "Fn::FindInMap: a key") for a in args[:3])
        mapping = self.mappings.get(name)
        if not isinstance(mapping, dict):
            raise Unresolvable(f"Fn::FindInMap: no mapping {name!r} in Mappings")
        entry = mapping.get(top)
        if isinstance(entry, dict) and second in entry:
            return self.resolve(entry[second])
        if isinstance(default, dict) and "DefaultValue" in default:
            return self.resolve(default["DefaultValue"])
        raise Unresolvable(f"Fn::FindInMap: mapping {name!r} has no {top!r} / {second!r}")

    def _fn_if(self, arg: Any) -> Any:
        name, if_true, if_false = _args("Fn::If", arg, 3)
        return self.resolve(if_true if self.condition(name) else if_false)

    def _fn_equals(self, arg: Any) -> bool:
        left, right = (self.resolve(a) for a in _args("Fn::Equals", arg, 2))
        if isinstance(left, list | dict) or isinstance(right, list | dict):
            return bool(left == right)
        return scalar_text(left, "Fn::Equals") == scalar_text(right, "Fn::Equals")

    def _fn_not(self, arg: Any) -> bool:
        (operand,) = _args("Fn::Not", arg, 1)
        return not self._truth(operand, "Fn::Not")

    def _fn_and(self, arg: Any) -> bool:
        return all(self._truth(operand, "Fn::And") for operand in _args("Fn::And", arg, (2, 10)))

    def _fn_or(self, arg: Any) -> bool:
        return any(self._truth(operand, "Fn::Or") for operand in _args("Fn::Or", arg, (2, 10)))

    def _fn_base64(self, arg: Any) -> str:
        text = scalar_text(self.resolve(arg), "Fn::Base64")
        return base64.b64encode(text.encode()).decode("ascii")

    def _fn_cidr(self, arg: Any) -> list[str]:
        block, count, bits = _args("Fn::Cidr", self.resolve(arg), 3)
        try:
            network = ipaddress.ip_network(scalar_text(block, "Fn::Cidr"), strict=False)
            prefix = network.max_prefixlen - _index(bits, "Fn::Cidr")
            subnets = network.subnets(new_prefix=prefix)
            return [str(next(subnets)) for _ in range(_index(count, "Fn::Cidr"))]
        except (ValueError, StopIteration) as exc:
            raise Unresolvable(f"Fn::Cidr: cannot split {block!r} that way ({exc})") from None

    def _fn_length(self, arg: Any) -> int:
        items = self.resolve(arg)
        if not isinstance(items, list):
            raise Unresolvable(f"Fn::Length takes a list, not {_describe(items)}")
        return len(items)

    def _fn_tojsonstring(self, arg: Any) -> str:
        return json.dumps(self.resolve(arg), separators=(",", ":"))

    def _fn_getazs(self, arg: Any) -> Any:
        raise Unresolvable("Fn::GetAZs asks the AWS account; it has no local value")

    def _fn_importvalue(self, arg: Any) -> Any:
        raise Unresolvable("Fn::ImportValue refers to another stack; it has no local value")

    def _fn_transform(self, arg: Any) -> Any:
        raise Unresolvable("Fn::Transform runs a CloudFormation macro; lambdabox cannot run it")
