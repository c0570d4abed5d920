"""EventInvokeConfig in templates: SAM's property (with Globals), CloudFormation's resource, defaults, destinations
as ARNs, names, template resources or SAM-created queues and topics, and every refusal."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lambdabox.core.errors import TemplateError
from lambdabox.core.model import EventInvokeConfig
from lambdabox.template.load import load_template

HEADER = """
Parameters:
  Retries: {Type: Number, Default: 1}
Resources:
  Fn:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: src
      Handler: app.handler
      Runtime: python3.12
"""


def load(tmp_path: Path, properties: str = "", more: str = "", header: str = HEADER) -> dict[str, EventInvokeConfig]:
    (tmp_path / "src").mkdir(exist_ok=True)
    body = textwrap.dedent(header) + textwrap.indent(textwrap.dedent(properties), " " * 6) + more
    (tmp_path / "template.yaml").write_text(body)
    template = load_template(tmp_path / "template.yaml")
    return {name: config.event_invoke for name, config in template.functions.items()}


OTHER = """
  Other:
    Type: AWS::Serverless::Function
    Properties: {CodeUri: src, Handler: app.handler, Runtime: python3.12, FunctionName: other-fn}
  Queue:
    Type: AWS::SQS::Queue
  Topic:
    Type: AWS::SNS::Topic
  Bus:
    Type: AWS::Events::EventBus
  Bucket:
    Type: AWS::S3::Bucket
"""


def test_lambdas_defaults_when_there_is_no_event_invoke_config(tmp_path: Path) -> None:
    config = load(tmp_path)["Fn"]
    assert config == EventInvokeConfig(maximum_retry_attempts=2, maximum_event_age_s=21600)
    assert config.on_success is None and config.on_failure is None


def test_sam_event_invoke_config_with_function_destinations(tmp_path: Path) -> None:
    properties = """
    EventInvokeConfig:
      MaximumRetryAttempts: !Ref Retries
      MaximumEventAgeInSeconds: 120
      DestinationConfig:
        OnSuccess: {Type: Lambda, Destination: !GetAtt Other.Arn}
        OnFailure: {Type: Lambda, Destination: !Ref Other}
    """
    config = load(tmp_path, properties, OTHER)["Fn"]
    assert config == EventInvokeConfig(
        maximum_retry_attempts=1,
        maximum_event_age_s=120,
        on_success="arn:aws:lambda:us-east-1:123456789012:function:other-fn",
        on_failure="other-fn",
    )


@pytest.mark.parametrize(
    ("destination", "arn"),
    [
        ("{Type: SQS, Destination: !GetAtt Queue.Arn}", "arn:aws:sqs:us-east-1:123456789012:Queue"),
        ("{Type: SNS, Destination: !Ref Topic}", "arn:aws:sns:us-east-1:123456789012:Topic"),
        ("{Type: EventBridge, Destination: !GetAtt Bus.Arn}", "arn:aws:events:us-east-1:123456789012:event-bus/Bus"),
        ("{Type: S3Bucket, Destination: !GetAtt Bucket.Arn}", "arn:aws:s3:::Bucket"),
        ("{Type: SQS}", "arn:aws:sqs:us-east-1:123456789012:FnEventInvokeConfigOnFailureQueue"),
        ("{Type: SNS}", "arn:aws:sns:us-east-1:123456789012:FnEventInvokeConfigOnFailureTopic"),
        ("{Type: SQS, Destination: arn:aws:sqs:eu-west-1:111111111111:dlq}", "arn:aws:sqs:eu-west-1:111111111111:dlq"),
        ('{Type: SQS, Destination: !Sub "arn:aws:sqs:${AWS::Region}:${AWS::AccountId}:q"}',
         "arn:aws:sqs:us-east-1:123456789012:q"),
    ],
)  # fmt: skip
def test_other_destinations_get_their_arn_or_a_stand_in(tmp_path: Path, destination: str, arn: str) -> None:
    properties = f"EventInvokeConfig:\n  DestinationConfig:\n    OnFailure: {destination}\n"
    assert load(tmp_path, properties, OTHER)["Fn"].on_failure == arn


def test_globals_are_merged_key_by_key(tmp_path: Path) -> None:
    header = "Globals:\n  Function:\n    EventInvokeConfig: {MaximumRetryAttempts: 0, MaximumEventAgeInSeconds: 60}\n"
    properties = "EventInvokeConfig: {MaximumEventAgeInSeconds: 300}\n"
    config = load(tmp_path, properties, OTHER, header=header + HEADER)
    assert config["Fn"].maximum_retry_attempts == 0 and config["Fn"].maximum_event_age_s == 300
    assert config["Other"] == EventInvokeConfig(maximum_retry_attempts=0, maximum_event_age_s=60)


def test_cloudformation_event_invoke_config_resource(tmp_path: Path) -> None:
    more = (
        OTHER
        + """
  OtherAsync:
    Type: AWS::Lambda::EventInvokeConfig
    Properties:
      FunctionName: !Ref Other
      Qualifier: $LATEST
      MaximumRetryAttempts: 0
      DestinationConfig:
        OnFailure: {Destination: !GetAtt Fn.Arn}
"""
    )
    configs = load(tmp_path, "", more)
    assert configs["Other"] == EventInvokeConfig(
        maximum_retry_attempts=0, on_failure="arn:aws:lambda:us-east-1:123456789012:function:Fn"
    )
    assert configs["Fn"] == EventInvokeConfig()


@pytest.mark.parametrize(
    ("properties", "more", "rule"),
    [
        ("EventInvokeConfig: [1]", "", "EventInvokeConfig must be a mapping"),
        ("EventInvokeConfig: {MaximumRetryAttempts: 3}", "", "EventInvokeConfig.MaximumRetryAttempts 3 must be a whole "
         "number from 0 to 2"),
        ("EventInvokeConfig: {MaximumEventAgeInSeconds: 59}", "", "MaximumEventAgeInSeconds 59 must be a whole number "
         "from 60 to 21600"),
        ("EventInvokeConfig: {MaximumEventAgeInSeconds: true}", "", "MaximumEventAgeInSeconds True"),
        ("EventInvokeConfig: {DestinationConfig: []}", "", "DestinationConfig must be a mapping"),
        ("EventInvokeConfig: {DestinationConfig: {OnSuccess: arn}}", "", "OnSuccess must be a mapping"),
        ("EventInvokeConfig: {DestinationConfig: {OnSuccess: {Type: Lambda}}}", "", "OnSuccess.Destination is missing"),
        ("EventInvokeConfig: {DestinationConfig: {OnSuccess: {Destination: !GetAtt Other.Name}}}", OTHER,
         "Fn::GetAtt Other.Name"),
        ("", "  Orphan:\n    Type: AWS::Lambda::EventInvokeConfig\n    Properties: {FunctionName: ghost, "
         "Qualifier: $LATEST}\n", "Orphan: FunctionName 'ghost' is not a function of this template"),
    ],
)  # fmt: skip
def test_bad_event_invoke_config_is_refused(tmp_path: Path, properties: str, more: str, rule: str) -> None:
    with pytest.raises(TemplateError) as caught:
        load(tmp_path, properties, more)
    message = str(caught.value)
    assert str(tmp_path / "template.yaml") in message and rule in message
