#!/usr/bin/env bash
# Install the AWS SDK for JavaScript v3's Lambda client (@aws-sdk/client-lambda, from npm) for the tests that
# drive lambdabox's Invoke API with it (tests/test_invoke_api_js.py).
#
# Idempotent: when this version is already installed it exits at once.
# Target: $LAMBDABOX_NODE_SDK_DIR, default <repo>/.lambdabox/node-sdk (gitignored; kept apart from aws-lambda-ric's
# .lambdabox/node); the tests load it from <target>/node_modules/@aws-sdk/client-lambda.
# Version: $LAMBDABOX_NODE_SDK_VERSION, default the pinned one below (pure JavaScript: no native build).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${LAMBDABOX_NODE_SDK_DIR:-$repo_root/.lambdabox/node-sdk}"
spec="${LAMBDABOX_NODE_SDK_VERSION:-3.1164.0}"

command -v node >/dev/null || { echo "install-node-sdk: node is not on PATH" >&2; exit 1; }
command -v npm >/dev/null || { echo "install-node-sdk: npm is not on PATH" >&2; exit 1; }

stamp="$dest/.lambdabox-sdk"
want="@aws-sdk/client-lambda@$spec"
pkg="$dest/node_modules/@aws-sdk/client-lambda"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -f "$pkg/package.json" ]]; then
    echo "@aws-sdk/client-lambda $(node -p "require('$pkg/package.json').version") already installed in $pkg"
    exit 0
fi

mkdir -p "$dest"
[[ -f "$dest/package.json" ]] || echo '{"name": "lambdabox-node-sdk", "private": true}' >"$dest/package.json"
rm -f "$stamp"
echo "npm install $want into $dest"
npm install --prefix "$dest" --no-audit --no-fund --omit=dev --save-exact "$want"

# The install is only good if the client loads and has what the tests use.
(cd "$dest" && node -e "
const sdk = require('@aws-sdk/client-lambda');
if (typeof sdk.LambdaClient !== 'function' || typeof sdk.InvokeCommand !== 'function') {
  console.error('install-node-sdk: @aws-sdk/client-lambda has no LambdaClient/InvokeCommand'); process.exit(1);
}
")
echo "$want" >"$stamp"
echo "@aws-sdk/client-lambda $(node -p "require('$pkg/package.json').version") installed in $pkg"
