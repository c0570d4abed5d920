"""SAM templates into FunctionConfig: short forms, intrinsics, Globals, lookup, code and layer paths, and the
refusals of what lambdabox cannot run."""

from __future__ import annotations

import base64
import textwrap
import zipfile
from pathlib import Path

import pytest

from lambdabox.core.errors import TemplateError
from lambdabox.core.model import DEFAULT_ACCOUNT_ID, DEFAULT_REGION, FunctionConfig, LayerConfig
from lambdabox.template.intrinsic import load_yaml
from lambdabox.template.load import Template, load_template
from template_support import function_yaml, one, refused, write

ARN_PREFIX = f"arn:aws:lambda:{DEFAULT_REGION}:{DEFAULT_ACCOUNT_ID}:function:"


# --- YAML ------------------------------------------------------------------------------------------


def test_every_short_form_loads_as_its_long_form() -> None:
    doc = load_yaml(
        textwrap.dedent(
            """
            ref: !Ref Param
            sub: !Sub "${AWS::Region}-x"
            sub_list: !Sub ["${A}", {A: !Ref P}]
            getatt: !GetAtt Fn.Arn
            getatt_nested: !GetAtt Res.Endpoint.Address
            getatt_list: [!GetAtt [Fn, Arn]]
            join: !Join [",", [a, b]]
            select: !Select [0, [a]]
            split: !Split [",", "a,b"]
            if: !If [Cond, a, b]
            equals: !Equals [a, b]
            not: !Not [!Condition C]
            and: !And [!Condition A, !Condition B]
            or: !Or [!Condition A, !Condition B]
            findinmap: !FindInMap [M, k, v]
            base64: !Base64 text
            cidr: !Cidr ["10.0.0.0/16", 2, 8]
            getazs: !GetAZs ""
            importvalue: !ImportValue Exported
            condition: !Condition C
            transform: !Transform {Name: Macro, Parameters: {a: 1}}
            date: 2010-09-09
            """
        )
    )
    assert doc == {
        "ref": {"Ref": "Param"},
        "sub": {"Fn::Sub": "${AWS::Region}-x"},
        "sub_list": {"Fn::Sub": ["${A}", {"A": {"Ref": "P"}}]},
        "getatt": {"Fn::GetAtt": ["Fn", "Arn"]},
        "getatt_nested": {"Fn::GetAtt": ["Res", "Endpoint.Address"]},
        "getatt_list": [{"Fn::GetAtt": ["Fn", "Arn"]}],
        "join": {"Fn::Join": [",", ["a", "b"]]},
        "select": {"Fn::Select": [0, ["a"]]},
        "split": {"Fn::Split": [",", "a,b"]},
        "if": {"Fn::If": ["Cond", "a", "b"]},
        "equals": {"Fn::Equals": ["a", "b"]},
        "not": {"Fn::Not": [{"Condition": "C"}]},
        "and": {"Fn::And": [{"Condition": "A"}, {"Condition": "B"}]},
        "or": {"Fn::Or": [{"Condition": "A"}, {"Condition": "B"}]},
        "findinmap": {"Fn::FindInMap": ["M", "k", "v"]},
        "base64": {"Fn::Base64": "text"},
        "cidr": {"Fn::Cidr": ["10.0.0.0/16", 2, 8]},
        "getazs": {"Fn::GetAZs": ""},
        "importvalue": {"Fn::ImportValue": "Exported"},
        "condition": {"Condition": "C"},
        "transform": {"Fn::Transform": {"Name": "Macro", "Parameters": {"a": 1}}},
        "date": "2010-09-09",
    }


def test_a_template_with_unused_unresolvable_properties_loads(tmp_path: Path) -> None:
    config = one(
        tmp_path,
        function_yaml(
            """
            Policies:
              - !ImportValue SharedPolicy
            Events:
              Queue:
                Type: SQS
                Properties:
                  Queue: !GetAtt Queue.Arn
                  Other: !GetAZs ""
            """
        ),
    )
    assert config.function_name == "Fn"


def test_minimal_function_gets_lambda_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, function_yaml())
    config = load_template(path).function(None)
    assert config == FunctionConfig(
        logical_id="Fn",
        function_name="Fn",
        runtime="python3.12",
        handler="app.handler",
        code=(tmp_path / "src").resolve(),
        template=path,
    )
    assert config.timeout_s == 3.0
    assert config.memory_mb == 128
    assert config.code.is_absolute()


def test_all_properties(tmp_path: Path) -> None:
    config = one(
        tmp_path,
        function_yaml(
            """
            FunctionName: my-function
            Timeout: 30
            MemorySize: 1024
            ReservedConcurrentExecutions: 5
            AutoPublishAlias: live
            ProvisionedConcurrencyConfig:
              ProvisionedConcurrentExecutions: 2
            Layers: [layer]
            Environment:
              Variables:
                TEXT: hello
                NUMBER: 5
                FLOAT: 1.5
                FLAG: true
                OFF: false
            """
        ),
    )
    assert config.function_name == "my-function"
    assert config.timeout_s == 30.0
    assert config.memory_mb == 1024
    assert config.reserved_concurrency == 5
    assert config.provisioned_concurrency == 2
    assert config.layers == (LayerConfig(name="layer", content=(tmp_path / "layer").resolve()),)
    assert config.environment == {"TEXT": "hello", "NUMBER": "5", "FLOAT": "1.5", "FLAG": "true", "OFF": "false"}
    assert all(isinstance(v, str) for v in config.environment.values())


def test_code_uri_may_be_a_zip_and_defaults_to_the_template_directory(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "code.zip", "w") as zf:
        zf.writestr("app.py", "x")
    body = """
    Resources:
      Zipped:
        Type: AWS::Serverless::Function
        Properties: {CodeUri: code.zip, Handler: app.handler, Runtime: nodejs20.x}
      Here:
        Type: AWS::Serverless::Function
        Properties: {Handler: app.handler, Runtime: python3.9}
    """
    template = load_template(write(tmp_path, body))
    assert template.function("Zipped").code == tmp_path.resolve() / "code.zip"
    assert template.function("Here").code == tmp_path.resolve()


def test_lambda_function_with_a_local_code_path(tmp_path: Path) -> None:
    body = """
    Resources:
      Built:
        Type: AWS::Lambda::Function
        Properties:
          Code: src
          Handler: app.handler
          Runtime: python3.14
          Timeout: 10
          Layers: [!Ref Lib]
          Environment: {Variables: {A1: b}}
      Lib:
        Type: AWS::Lambda::LayerVersion
        Properties: {Content: layer}
    """
    config = one(tmp_path, body)
    assert config.code == (tmp_path / "src").resolve()
    assert config.timeout_s == 10.0
    assert config.environment == {"A1": "b"}
    assert config.layers == (LayerConfig(name="Lib", content=(tmp_path / "layer").resolve()),)


def test_lambda_function_with_s3_code_is_refused(tmp_path: Path) -> None:
    body = """
    Resources:
      Remote:
        Type: AWS::Lambda::Function
        Properties: {Code: {S3Bucket: b, S3Key: k}, Handler: app.handler, Runtime: python3.12}
    """
    refused(tmp_path, body, "Remote", "Code must be a local directory or .zip path")


# --- intrinsics ------------------------------------------------------------------------------------

INTRINSICS = """
Parameters:
  Stage: {Type: String, Default: dev, AllowedValues: [dev, prod]}
  Size: {Type: Number, Default: 256}
  Names: {Type: CommaDelimitedList, Default: "alpha, beta,gamma"}
Mappings:
  Accounts:
    123456789012: {Name: main}
  Sizes:
    dev: {Timeout: 5}
    prod: {Timeout: 60}
Conditions:
  IsProd: !Equals [!Ref Stage, prod]
  IsDev: !Not [!Condition IsProd]
  DevInRegion: !And [!Condition IsDev, !Equals [!Ref "AWS::Region", us-east-1]]
  Either: !Or [!Condition IsProd, !Condition DevInRegion]
Globals:
  Function:
    Runtime: python3.12
    Handler: app.handler
    CodeUri: src
Resources:
  Lib:
    Type: AWS::Serverless::LayerVersion
    Properties: {ContentUri: layer}
  Other:
    Type: AWS::Serverless::Function
    Properties:
      FunctionName: !Sub "${AWS::StackName}-other-${Stage}"
  Fn:
    Type: AWS::Serverless::Function
    Properties:
      FunctionName: !Join ["-", [fn, !Ref Stage]]
      MemorySize: !Ref Size
      Timeout: !FindInMap [Sizes, !Ref Stage, Timeout]
      Layers: [!Ref Lib]
      Environment:
        Variables:
          REGION: !Ref AWS::Region
          ACCOUNT: !Ref AWS::AccountId
          STACK: !Ref AWS::StackName
          PARTITION: !Ref AWS::Partition
          SUFFIX: !Ref AWS::URLSuffix
          GONE: !Ref AWS::NoValue
          IF_GONE: !If [IsProd, here, !Ref AWS::NoValue]
          OTHER_NAME: !Ref Other
          OTHER_ARN: !GetAtt Other.Arn
          SUB: !Sub "${Stage}/${AWS::Region}/${Other.Arn}/${!Literal}"
          SUB_VARS: !Sub ["${Greeting}, ${Who}", {Greeting: hello, Who: !Ref Stage}]
          SELECT: !Select [1, !Ref Names]
          SPLIT_SELECT: !Select [2, !Split [":", "a:b:c"]]
          JOIN_SPLIT: !Join ["+", !Split [",", "x,y"]]
          IF_DEV: !If [IsDev, dev-value, prod-value]
          IF_EITHER: !If [Either, yes-either, no-either]
          IF_AND: !If [DevInRegion, and-true, and-false]
          BASE64: !Base64 hello
          CIDR: !Select [1, !Cidr ["10.0.0.0/16", 3, 8]]
          LONG_FORM: {"Fn::Join": ["", [{"Ref": "Stage"}, "!"]]}
          ACCOUNT_NAME: !FindInMap [Accounts, !Ref AWS::AccountId, Name]
"""


def test_every_resolved_intrinsic(tmp_path: Path) -> None:
    template = load_template(write(tmp_path, INTRINSICS))
    config = template.function("Fn")
    assert config.function_name == "fn-dev"
    assert config.memory_mb == 256
    assert config.timeout_s == 5.0
    assert config.layers == (LayerConfig(name="Lib", content=(tmp_path / "layer").resolve()),)
    other_arn = ARN_PREFIX + "lambdabox-other-dev"
    assert dict(config.environment) == {
        "REGION": DEFAULT_REGION,
        "ACCOUNT": DEFAULT_ACCOUNT_ID,
        "STACK": "lambdabox",
        "PARTITION": "aws",
        "SUFFIX": "amazonaws.com",
        "OTHER_NAME": "lambdabox-other-dev",
        "OTHER_ARN": other_arn,
        "SUB": f"dev/{DEFAULT_REGION}/{other_arn}/${{Literal}}",
        "SUB_VARS": "hello, dev",
        "SELECT": "beta",
        "SPLIT_SELECT": "c",
        "JOIN_SPLIT": "x+y",
        "IF_DEV": "dev-value",
        "IF_EITHER": "yes-either",
        "IF_AND": "and-true",
        "BASE64": base64.b64encode(b"hello").decode(),
        "CIDR": "10.0.1.0/24",
        "LONG_FORM": "dev!",
        "ACCOUNT_NAME": "main",
    }
    assert config.arn == ARN_PREFIX + "fn-dev"


def test_parameter_overrides_change_conditions_and_mappings(tmp_path: Path) -> None:
    template = load_template(write(tmp_path, INTRINSICS), {"Stage": "prod", "Size": "512"})
    config = template.function("fn-prod")
    assert config.memory_mb == 512
    assert config.timeout_s == 60.0
    assert config.environment["IF_GONE"] == "here"
    assert config.environment["IF_DEV"] == "prod-value"
    assert config.environment["IF_AND"] == "and-false"
    assert template.function("Other").function_name == "lambdabox-other-prod"


def test_override_outside_allowed_values_is_refused(tmp_path: Path) -> None:
    rule = "'test' is not one of its AllowedValues"
    refused(tmp_path, INTRINSICS, "Other", "FunctionName", rule, overrides={"Stage": "test"})


def test_a_resource_whose_condition_is_false_is_not_created(tmp_path: Path) -> None:
    body = function_yaml() + textwrap.dedent(
        """
          ProdOnly:
            Type: AWS::Serverless::Function
            Condition: IsProd
            Properties: {CodeUri: src, Handler: app.handler, Runtime: python3.12}
        Parameters:
          Stage: {Type: String, Default: dev}
        Conditions:
          IsProd: !Equals [!Ref Stage, prod]
        """
    )
    assert list(load_template(write(tmp_path, body)).functions) == ["Fn"]
    assert list(load_template(write(tmp_path, body), {"Stage": "prod"}).functions) == ["Fn", "ProdOnly"]


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("!ImportValue Shared", "Fn::ImportValue refers to another stack"),
        ('!GetAZs ""', "Fn::GetAZs"),
        ("!Ref Missing", "Ref Missing: no parameter or resource of that name"),
        ("!Ref NoDefault", "parameter NoDefault has no Default and no override"),
        ("!Ref AWS::NotificationARNs", "AWS::NotificationARNs"),
        ("!GetAtt Fn.Name", "Fn::GetAtt Fn.Name"),
        ("!Ref Bucket", "AWS::S3::Bucket resource has no local value"),
        ('!Sub "${Bucket.Arn}"', "Fn::GetAtt Bucket.Arn"),
        ("!If [Undefined, a, b]", "Condition 'Undefined' is not defined"),
        ("!Select [3, [a, b]]", "index 3 is past the end"),
        ("!FindInMap [Nope, a, b]", "no mapping 'Nope'"),
        ("!Transform {Name: M}", "Fn::Transform"),
        ("!Join [',', [[a]]]", "Fn::Join: an item must be a string, not a list"),
        ("!Ref Lib", "Environment variable VALUE must be a string, not LayerConfig"),
    ],
)
def test_unresolvable_intrinsic_in_a_used_property_is_refused(tmp_path: Path, value: str, rule: str) -> None:
    body = function_yaml(f"Environment:\n  Variables:\n    VALUE: {value}\n") + textwrap.dedent(
        """
          Bucket:
            Type: AWS::S3::Bucket
          Lib:
            Type: AWS::Serverless::LayerVersion
            Properties: {ContentUri: layer}
        Parameters:
          NoDefault: {Type: String}
        """
    )
    refused(tmp_path, body, "Fn", "Environment", rule)


# --- Globals ---------------------------------------------------------------------------------------


def test_globals_merge(tmp_path: Path) -> None:
    (tmp_path / "layer2").mkdir()
    body = """
    Globals:
      Function:
        Runtime: python3.11
        Handler: app.global_handler
        Timeout: 20
        MemorySize: 256
        Layers: [layer]
        Environment:
          Variables: {SHARED: global, OVERRIDDEN: global}
    Resources:
      Fn:
        Type: AWS::Serverless::Function
        Properties:
          CodeUri: src
          Handler: app.handler
          Timeout: 5
          Layers: [layer2]
          Environment:
            Variables: {OVERRIDDEN: local, OWN: local}
      Plain:
        Type: AWS::Serverless::Function
        Properties: {CodeUri: src}
      NotSam:
        Type: AWS::Lambda::Function
        Properties: {Code: src, Handler: app.handler, Runtime: nodejs22.x}
    """
    template = load_template(write(tmp_path, body))
    fn = template.function("Fn")
    assert fn.runtime == "python3.11"
    assert fn.handler == "app.handler"
    assert fn.timeout_s == 5.0
    assert fn.memory_mb == 256
    assert [layer.name for layer in fn.layers] == ["layer", "layer2"]
    assert fn.environment == {"SHARED": "global", "OVERRIDDEN": "local", "OWN": "local"}
    plain = template.function("Plain")
    assert (plain.handler, plain.timeout_s, plain.environment) == (
        "app.global_handler",
        20.0,
        {"SHARED": "global", "OVERRIDDEN": "global"},
    )
    not_sam = template.function("NotSam")  # Globals apply to AWS::Serverless::Function only
    assert (not_sam.timeout_s, not_sam.memory_mb, not_sam.layers, not_sam.environment) == (3.0, 128, (), {})


def test_globals_with_an_unresolvable_used_property_names_globals(tmp_path: Path) -> None:
    body = "Globals:\n  Function:\n    Timeout: !ImportValue T\n" + function_yaml()
    refused(tmp_path, body, "Globals.Function", "Timeout", "Fn::ImportValue")


# --- lookup ----------------------------------------------------------------------------------------


def two_functions(tmp_path: Path) -> Template:
    body = """
    Resources:
      First:
        Type: AWS::Serverless::Function
        Properties: {CodeUri: src, Handler: app.handler, Runtime: python3.12, FunctionName: first-fn}
      Second:
        Type: AWS::Serverless::Function
        Properties: {CodeUri: src, Handler: app.handler, Runtime: python3.12, FunctionName: First}
    """
    return load_template(write(tmp_path, body))


def test_lookup_by_logical_id_then_function_name(tmp_path: Path) -> None:
    template = two_functions(tmp_path)
    assert list(template.functions) == ["First", "Second"]
    assert template.function("First").logical_id == "First"  # the logical id wins
    assert template.function("first-fn").logical_id == "First"
    assert template.function("Second").function_name == "First"


def test_lookup_without_a_name_needs_exactly_one_function(tmp_path: Path) -> None:
    template = two_functions(tmp_path)
    with pytest.raises(TemplateError, match="several functions; choose one of First, Second") as caught:
        template.function(None)
    assert str(template.source) in str(caught.value)
    single = tmp_path / "single"
    single.mkdir()
    assert one(single, function_yaml()).logical_id == "Fn"


def test_lookup_of_an_unknown_name_lists_the_choices(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"no function 'nope'; choose one of First \(first-fn\), Second \(First\)"):
        two_functions(tmp_path).function("nope")


def test_lookup_in_a_template_without_functions(tmp_path: Path) -> None:
    body = "Resources:\n  Lib:\n    Type: AWS::Serverless::LayerVersion\n    Properties: {ContentUri: layer}\n"
    template = load_template(write(tmp_path, body))
    assert template.functions == {}
    with pytest.raises(TemplateError, match="has no functions"):
        template.function(None)


# --- refusals --------------------------------------------------------------------------------------


def test_remote_layer_arn_is_refused(tmp_path: Path) -> None:
    arn = "arn:aws:lambda:us-east-1:123456789012:layer:lib:3"
    refused(tmp_path, function_yaml(f"Layers: ['{arn}']"), "Fn", arn, "remote layer ARN")


def test_missing_code_uri_path_is_refused(tmp_path: Path) -> None:
    body = function_yaml().replace("CodeUri: src", "CodeUri: nowhere")
    refused(tmp_path, body, "Fn", "CodeUri path 'nowhere' does not exist")


def test_missing_content_uri_path_is_refused(tmp_path: Path) -> None:
    body = function_yaml("Layers: [!Ref Lib]") + (
        "  Lib:\n    Type: AWS::Serverless::LayerVersion\n    Properties: {ContentUri: gone}\n"
    )
    refused(tmp_path, body, "Lib", "ContentUri path 'gone' does not exist")


def test_code_uri_that_is_a_plain_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("x")
    body = function_yaml().replace("CodeUri: src", "CodeUri: app.py")
    refused(tmp_path, body, "Fn", "must be a directory or a .zip file")


def test_image_package_type_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, function_yaml("PackageType: Image\nImageUri: repo:tag"), "Fn", "PackageType Image")


def test_duplicate_function_names_are_refused(tmp_path: Path) -> None:
    body = (
        function_yaml("FunctionName: same") + function_yaml("FunctionName: same", name="Twin").split("Resources:\n")[1]
    )
    refused(tmp_path, body, "Twin", "FunctionName 'same' is already used by Fn")


def test_a_function_may_refer_to_its_own_name_and_arn(tmp_path: Path) -> None:
    config = one(
        tmp_path, function_yaml("FunctionName: me\nEnvironment: {Variables: {NAME: !Ref Fn, ARN: !GetAtt Fn.Arn}}")
    )
    assert config.environment == {"NAME": "me", "ARN": ARN_PREFIX + "me"}


def test_a_function_name_that_refers_to_itself_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, function_yaml('FunctionName: !Sub "${Fn}-x"'), "Fn", "FunctionName", "refers to itself")
