"""lambdabox: run AWS Lambda functions and Lambda extensions locally, as the Lambda service runs them."""

__version__ = "0.1.0"
