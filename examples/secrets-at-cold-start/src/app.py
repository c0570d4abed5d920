"""A function that reads its secrets once, at cold start, from the files the secrets-at-cold-start extension wrote
under /tmp/secrets before the function's code ran. It never returns or logs a secret: fingerprints say which
values it holds."""

import hashlib
from pathlib import Path

SECRETS_DIR = Path("/tmp/secrets")
SECRETS = {path.name: path.read_text() for path in sorted(SECRETS_DIR.iterdir())}
print(f"cold start: read secrets {', '.join(SECRETS)}")


def fingerprint(value):
    return hashlib.sha256(value.encode()).hexdigest()[:12]


def handler(event, context):
    return {
        "read_at_cold_start": {name: fingerprint(value) for name, value in SECRETS.items()},
        "in_tmp": {path.name: oct(path.stat().st_mode & 0o777) for path in sorted(SECRETS_DIR.iterdir())},
        "tmp_secrets_mode": oct(SECRETS_DIR.stat().st_mode & 0o777),
    }
