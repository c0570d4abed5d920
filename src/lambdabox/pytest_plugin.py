"""The pytest plugin (entry point ``pytest11``): the ``lambda_function`` factory fixture, whose functions are shut
down when the test ends, pass or fail; ``lambdabox_template`` and ``lambdabox_options``; on a failure, a report
section per function with what it saw. Nothing of lambdabox is imported until a test asks for a fixture.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from lambdabox.environment.options import Options
    from lambdabox.testing import LambdaFunction

__all__ = [
    "lambda_function",
    "lambdabox_options",
    "lambdabox_template",
    "pytest_addoption",
    "pytest_runtest_makereport",
]

TEMPLATE_HELP = "the SAM or CloudFormation template of lambda_function (default: template.yaml at the rootdir)"
_STARTED = pytest.StashKey[list["LambdaFunction"]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lambdabox", "lambdabox: run Lambda functions and extensions locally")
    group.addoption("--lambdabox-template", metavar="PATH", default=None, help=TEMPLATE_HELP)
    parser.addini("lambdabox_template", f"{TEMPLATE_HELP}; relative to the ini file", default="")


@pytest.fixture
def lambdabox_template(request: pytest.FixtureRequest) -> Path:
    """The template path: --lambdabox-template (relative to the working directory), else the ``lambdabox_template``
    ini setting (relative to the ini file), else template.yaml at the rootdir."""
    config = request.config
    option = config.getoption("lambdabox_template")
    if option:
        path: Path = config.invocation_params.dir / str(option)
    elif setting := str(config.getini("lambdabox_template")):
        path = (config.inipath.parent if config.inipath else config.rootpath) / setting
    else:
        path = config.rootpath / "template.yaml"
        if not path.is_file():
            pytest.fail(
                f"lambdabox_template: no template; pass --lambdabox-template PATH, set lambdabox_template in the ini "
                f"file, or put template.yaml in {config.rootpath}",
                pytrace=False,
            )
    if not path.is_file():
        pytest.fail(f"lambdabox_template: {path} is not a file", pytrace=False)
    return path


@pytest.fixture
def lambdabox_options() -> Options | None:
    """The environments' options (freeze, isolate, private network); override this fixture to change them.
    None is lambdabox's defaults, those of ``lambdabox invoke``."""
    return None


class FunctionFactory:
    """``lambda_function(name=None, *, template=None, code=None, **settings)``: with ``code``, a function given
    inline (see lambdabox.testing.function_from_code); else the template's function ``name`` (``template``, by
    default the ``lambdabox_template`` fixture). Every function it starts is shut down at the end of the test."""

    def __init__(self, request: pytest.FixtureRequest, options: Options | None) -> None:
        self._request, self._options = request, options
        self.started: list[LambdaFunction] = []

    def __call__(
        self, name: str | None = None, *, template: str | Path | None = None, code: Any = None, **settings: Any
    ) -> LambdaFunction:
        from lambdabox.testing import function_from_code, function_from_template

        settings.setdefault("options", self._options)
        if code is not None:
            if name is not None:
                settings["name"] = name
            function = function_from_code(code=code, **settings)
        else:
            path = Path(template) if template is not None else self._request.getfixturevalue("lambdabox_template")
            function = function_from_template(path, name, **settings)
        self.started.append(function)
        return function

    def shutdown_all(self) -> None:
        """Shut every function down, the last started first; the first error is raised after all were tried."""
        errors: list[BaseException] = []
        for function in reversed(self.started):
            try:
                function.shutdown()
            except Exception as error:
                errors.append(error)
        if errors:
            raise errors[0]


@pytest.fixture
def lambda_function(request: pytest.FixtureRequest, lambdabox_options: Options | None) -> Iterator[FunctionFactory]:
    """Start functions for this test: ``lambda_function("Fn")`` (from the template), ``lambda_function(code={...},
    layers=[...], extensions={...})`` (inline). Each returns a lambdabox.testing.LambdaFunction; all are shut down
    when the test ends, pass or fail."""
    factory = FunctionFactory(request, lambdabox_options)
    request.node.stash[_STARTED] = factory.started
    try:
        yield factory
    finally:
        factory.shutdown_all()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """A failed test's report gets a section per function it started: its events, extension steps, last lines."""
    report = yield
    started = item.stash.get(_STARTED, None)
    if started and report.failed and call.when == "call":
        for function in started:
            report.sections.append((f"lambdabox: {function.config.logical_id}", function.describe()))
    return report
