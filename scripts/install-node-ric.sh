#!/usr/bin/env bash
# Install aws-lambda-ric (the Node.js Runtime Interface Client from npm) for lambdabox's nodejs* runtimes.
#
# Idempotent: when the package is already installed for this Node major version it exits at once.
# Target: $LAMBDABOX_NODE_DIR, default <repo>/.lambdabox/node (gitignored); lambdabox finds the package at
# <target>/node_modules/aws-lambda-ric, or wherever $LAMBDABOX_NODE_RIC points.
# Version: $LAMBDABOX_NODE_RIC_VERSION, default ^4 on Node >= 22 (aws-lambda-ric 4 needs it), else ^3.
# The package builds native code (aws-lambda-cpp and curl, with autotools) in its install scripts, so the
# Debian packages it needs are installed first when missing (as root, or through sudo).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${LAMBDABOX_NODE_DIR:-$repo_root/.lambdabox/node}"

command -v node >/dev/null || { echo "install-node-ric: node is not on PATH" >&2; exit 1; }
command -v npm >/dev/null || { echo "install-node-ric: npm is not on PATH" >&2; exit 1; }

node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [[ -n "${LAMBDABOX_NODE_RIC_VERSION:-}" ]]; then
    spec="$LAMBDABOX_NODE_RIC_VERSION"
elif ((node_major >= 22)); then
    spec="^4"
else
    spec="^3"
fi
stamp="$dest/.lambdabox-ric"
want="node$node_major aws-lambda-ric@$spec"
pkg="$dest/node_modules/aws-lambda-ric"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -f "$pkg/package.json" ]]; then
    echo "aws-lambda-ric $(node -p "require('$pkg/package.json').version") already installed in $pkg"
    exit 0
fi

# Debian packages for the native build (autotools for the bundled curl and aws-lambda-cpp, cmake and a
# C++ toolchain for node-gyp, python3 for gyp itself).
missing=()
for p in autoconf automake libtool cmake g++ make python3; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || { echo "install-node-ric: need root (or sudo) to apt-get install ${missing[*]}" >&2; exit 1; }
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# node-gyp downloads Node's headers unless told where they are; use the installed ones when present.
if [[ -z "${npm_config_nodedir:-}" ]]; then
    node_prefix="$(dirname "$(dirname "$(readlink -f "$(command -v node)")")")"
    if [[ -f "$node_prefix/include/node/node.h" ]]; then
        export npm_config_nodedir="$node_prefix"
    fi
fi

mkdir -p "$dest"
# A private package.json that approves aws-lambda-ric's install scripts (its native build): npm 11 warns
# that dependency install scripts will be blocked unless listed in allowScripts.
node -e '
const fs = require("fs"); const f = process.argv[1];
const pkg = fs.existsSync(f) ? JSON.parse(fs.readFileSync(f, "utf8")) : {name: "lambdabox-node-ric", private: true};
pkg.allowScripts = Object.assign({}, pkg.allowScripts, {"aws-lambda-ric": true});
fs.writeFileSync(f, JSON.stringify(pkg, null, 2) + "\n");
' "$dest/package.json"
rm -f "$stamp"
echo "npm install aws-lambda-ric@$spec into $dest (builds native code; takes a few minutes)"
npm install --prefix "$dest" --no-audit --no-fund "aws-lambda-ric@$spec"

# The install is only good if the native client loads. It reads AWS_LAMBDA_RUNTIME_API when loaded and
# aborts the process (std::logic_error) when it is unset, so give it one; nothing connects to it here.
(cd "$pkg" && AWS_LAMBDA_RUNTIME_API=127.0.0.1:9001 node -e "
const fs = require('fs'); const path = require('path');
const found = [];
(function walk(d) { for (const e of fs.readdirSync(d, {withFileTypes: true})) {
  const p = path.join(d, e.name);
  if (e.isDirectory() && e.name !== 'node_modules') walk(p); else if (e.name.endsWith('.node')) found.push(p);
} })('.');
const pkg = require('./package.json');
if (!found.length && pkg.gypfile) { console.error('install-node-ric: the native client was not built'); process.exit(1); }
for (const f of found) require(path.resolve(f));
")
echo "$want" >"$stamp"
echo "aws-lambda-ric $(node -p "require('$pkg/package.json').version") installed in $pkg"
