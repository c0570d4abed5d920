"""The pytest plugin as users meet it: test files run by pytester, with the plugin loaded from its entry point."""

from __future__ import annotations

import os
import textwrap

import psutil
import pytest

from lambdabox.testing import PYTHON_RUNTIME
from support import extension_script

pytest_plugins = ["pytester"]

HOME = os.environ["HOME"]  # pytester moves HOME under /tmp, which an isolated environment does not see
STRICT = '[tool.pytest.ini_options]\nfilterwarnings = ["error"]\naddopts = "--strict-markers"\n'
TEMPLATE = """\
Resources:
  Hello:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: src/
      Handler: app.handler
      Runtime: {runtime}
      Environment:
        Variables:
          GREETING: {greeting}
"""
APP = "import os\n\ndef handler(event, context):\n    return os.environ['GREETING']\n"


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester project with the test extension at ext.py, strict settings, and lambdabox's cache where it is."""
    monkeypatch.setenv("HOME", HOME)
    (pytester.path / "ext.py").write_bytes(extension_script("ext.py"))
    return pytester


def write_template(pytester: pytest.Pytester, directory: str, greeting: str) -> None:
    (pytester.path / directory / "src").mkdir(parents=True)
    (pytester.path / directory / "src" / "app.py").write_text(APP)
    (pytester.path / directory / "template.yaml").write_text(TEMPLATE.format(runtime=PYTHON_RUNTIME, greeting=greeting))


def test_functions_are_shut_down_after_a_failing_test_and_the_report_shows_what_they_saw(
    project: pytest.Pytester,
) -> None:
    project.makefile(".toml", pyproject=STRICT)
    project.makepyfile(
        test_user="""
        from pathlib import Path

        EXT = Path(__file__).parent / "ext.py"
        STARTED = []


        def test_fails_after_an_invoke(lambda_function):
            fn = lambda_function(code={"app.py": "def handler(event, context):\\n    return event\\n"},
                                 extensions={"ext": EXT})
            STARTED.append(fn)
            assert fn.invoke({"n": 1}).response == {"n": 2}


        def test_the_function_of_the_failed_test_was_shut_down():
            (fn,) = STARTED
            states = [step.state for step in fn.extension_events("ext")]
            assert states[-2:] == ["SHUTDOWN", "Exited"]
        """
    )
    result = project.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*assert {'n': 1} == {'n': 2}*",
            "*- lambdabox: Function -*",
            "function Function (python*): * events",
            "platform events: initStart, extension, initRuntimeDone, initReport, start, runtimeDone, report",
            "extension steps: ext Started, ext Ready, ext Waiting, ext INVOKE, ext Waiting",
            "last log lines (2 of 2):",
            '  [[]ext] {"ext": "ext", "what": "event", "event": {"eventType": "INVOKE"*',  # [[] is a [
        ]
    )
    assert psutil.Process().children(recursive=True) == []


def test_a_failing_helper_says_what_went_wrong(project: pytest.Pytester) -> None:
    project.makefile(".toml", pyproject=STRICT)
    project.makepyfile(
        test_user="""
        from lambdabox.testing import assert_invoked_ok

        APP = "def handler(event, context):\\n    print('about to fail')\\n    raise ValueError('boom')\\n"


        def test_invoke(lambda_function):
            assert_invoked_ok(lambda_function(code={"app.py": APP}).invoke({}))
        """
    )
    result = project.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            ">       assert_invoked_ok(lambda_function(code={*",
            "E       AssertionError: invoke *-*-*-*-* failed",
            "E       function error ValueError: boom",
            "E       REPORT status error, duration * ms, * MB used",
            "E       last log lines (2 of 2):",
            "E         [[]runtime] about to fail",
            "E         [[]runtime] [[]ERROR] ValueError: boom",
            "E           Traceback (most recent call last):",
        ]
    )
    assert "def assert_invoked_ok" not in result.stdout.str()  # the helper's own frame is hidden


def test_the_template_comes_from_the_ini_file_or_the_command_line(project: pytest.Pytester) -> None:
    write_template(project, "sam", "from the ini file")
    write_template(project, "other", "from the command line")
    project.makefile(".toml", pyproject=STRICT + 'lambdabox_template = "sam/template.yaml"\n')
    project.makepyfile(
        test_user="""
        def test_hello(lambda_function, lambdabox_template):
            fn = lambda_function("Hello")
            print("template:", lambdabox_template.relative_to(lambdabox_template.parent.parent))
            print("greeting:", fn.invoke().response)
            assert fn.config.template == lambdabox_template
        """
    )
    result = project.runpytest("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*template: sam/template.yaml", "greeting: from the ini file"])
    result = project.runpytest("-s", "--lambdabox-template", "other/template.yaml")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*template: other/template.yaml", "greeting: from the command line"])


def test_without_a_template_the_fixture_says_how_to_name_one(project: pytest.Pytester) -> None:
    project.makefile(".toml", pyproject=STRICT)
    project.makepyfile(test_user="def test_hello(lambda_function):\n    lambda_function('Hello')\n")
    result = project.runpytest()
    result.assert_outcomes(errors=0, failed=1)
    result.stdout.fnmatch_lines(["*lambdabox_template: no template; pass --lambdabox-template PATH, set*"])
    write_template(project, ".", "from template.yaml at the rootdir")
    project.makepyfile(
        test_user="def test_hello(lambda_function):\n"
        "    assert lambda_function('Hello').invoke().response == 'from template.yaml at the rootdir'\n"
    )
    project.runpytest().assert_outcomes(passed=1)
    result = project.runpytest("--lambdabox-template", "nowhere.yaml")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*lambdabox_template: */nowhere.yaml is not a file*"])


def test_options_come_from_an_overridable_fixture(project: pytest.Pytester) -> None:
    project.makefile(".toml", pyproject=STRICT)
    project.makeconftest(
        """
        import pytest
        from lambdabox.environment.options import Options


        @pytest.fixture
        def lambdabox_options():
            return Options(initialization_type="provisioned-concurrency")
        """
    )
    app = "import os\\n\\ndef handler(event, context):\\n    return os.environ['AWS_LAMBDA_INITIALIZATION_TYPE']\\n"
    project.makepyfile(
        test_user=f"""
        def test_options(lambda_function):
            fn = lambda_function(code={{"app.py": "{app}"}})
            fn.initialize()  # Init ahead of the first invoke, as provisioned concurrency has it
            assert fn.invoke().response == "provisioned-concurrency"
        """
    )
    project.runpytest().assert_outcomes(passed=1)


def test_the_plugin_costs_nothing_when_unused(project: pytest.Pytester) -> None:
    project.makefile(".toml", pyproject=STRICT)
    project.makepyfile(
        test_user="""
        import sys


        def test_nothing_of_lambdabox_is_imported(pytestconfig):
            assert pytestconfig.pluginmanager.has_plugin("lambdabox")
            assert "lambdabox.pytest_plugin" in sys.modules
            assert not [name for name in sys.modules if name.startswith(("lambdabox.", "aiohttp"))
                        and name != "lambdabox.pytest_plugin"]
        """
    )
    result = project.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    help_text = project.runpytest_subprocess("--help").stdout.str()
    assert "--lambdabox-template=PATH" in help_text and "lambdabox_template (string)" in help_text


def test_several_functions_in_one_test_are_all_shut_down(project: pytest.Pytester) -> None:
    project.makefile(".toml", pyproject=STRICT)
    project.makepyfile(
        test_user=textwrap.dedent(
            """
            from pathlib import Path

            EXT = Path(__file__).parent / "ext.py"
            APP = {"app.py": "def handler(event, context):\\n    return event\\n"}


            def test_two(lambda_function):
                first = lambda_function("First", code=APP, extensions={"ext": EXT})
                second = lambda_function("Second", code=APP, extensions={"ext": EXT})
                assert first.invoke(1).response == 1 and second.invoke(2).response == 2
                assert first.config.function_name == "First"
            """
        )
    )
    project.runpytest().assert_outcomes(passed=1)
    assert psutil.Process().children(recursive=True) == []
