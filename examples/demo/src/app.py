"""The demo function: logs a line and answers with a greeting."""

import os

print("cold start: module loaded")


def handler(event, context):
    print(f"handling request {context.aws_request_id} for {event.get('name')}")
    return {"message": f"{os.environ['GREETING']}, {event.get('name', 'world')}!"}
