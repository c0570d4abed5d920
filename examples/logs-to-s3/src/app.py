"""A function whose logs the logs-to-s3 extension stores in S3: it logs a line per item of the order it handles."""

print("cold start: order handler loaded")


def handler(event, context):
    items = event.get("items", [])
    for item in items:
        print(f"request {context.aws_request_id}: packed {item}")
    print(f"request {context.aws_request_id}: order {event.get('order')} done, {len(items)} items")
    return {"order": event.get("order"), "items": len(items)}
