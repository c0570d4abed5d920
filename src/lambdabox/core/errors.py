"""The one error tree of lambdabox; each API error knows its Lambda ``errorType`` and HTTP status.

LambdaboxError
├── ConfigError          bad template, layer or setting; refused before anything starts
│   ├── TemplateError    names the template file, the resource and the rule
│   └── LayerError       names the layer (or code) archive and the rule
├── SandboxError         the machine cannot give what an environment needs
└── ApiError             an HTTP API call refused, with Lambda's status and errorType
"""

from __future__ import annotations


class LambdaboxError(Exception):
    """Base of every error lambdabox raises on purpose."""


class ConfigError(LambdaboxError):
    """A template, layer or setting that lambdabox refuses before anything starts."""


class TemplateError(ConfigError):
    """A SAM/CloudFormation template that breaks a rule."""

    def __init__(self, source: str, resource: str | None, rule: str) -> None:
        where = f"{source}: {resource}" if resource else source
        super().__init__(f"{where}: {rule}")
        self.source = source
        self.resource = resource
        self.rule = rule


class LayerError(ConfigError):
    """A layer or code archive that breaks a rule (path traversal, size, count)."""

    def __init__(self, source: str, rule: str) -> None:
        super().__init__(f"{source}: {rule}")
        self.source = source
        self.rule = rule


class SandboxError(LambdaboxError):
    """The machine cannot provide an isolation or accounting feature an environment needs."""


class ApiError(LambdaboxError):
    """A refused API call: rendered as ``{"errorType", "errorMessage"}`` with ``status``."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
