"""A function that reads its configuration from the config-cache extension on localhost:2772, as functions read
AWS AppConfig's, at every invoke: the extension answers from memory, so this costs a local round trip."""

import json
import os
import urllib.request

CONFIG_URL = f"http://localhost:2772{os.environ['CONFIG_CACHE_PATH']}"


def handler(event, context):
    with urllib.request.urlopen(CONFIG_URL, timeout=2) as response:
        config = json.loads(response.read())
        version = response.headers["Configuration-Version"]
    checkout = "new" if config["features"]["new-checkout"] else "classic"
    return {"message": f"{config['greeting']}, {event.get('name', 'world')}", "checkout": checkout, "version": version}
