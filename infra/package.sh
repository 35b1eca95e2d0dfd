#!/usr/bin/env bash
# Builds the handler as one static Linux x86-64 binary and stages the Function App:
#
#   publish/
#     host.json  handler  .funcignore  [local.settings.json]
#     monitor-events/function.json  monitor-state/function.json  monitor-status/function.json
#
# `func azure functionapp publish <app>` and `func start` are both run from that folder.
#
#   infra/package.sh [--out DIR] [--azd]
#
# --azd (the azd prepackage hook) adds an empty package.json: azd packages the folder as Node.
#
# The target is x86_64-unknown-linux-musl when its standard library and a musl C compiler are
# installed (`rustup target add x86_64-unknown-linux-musl`, `musl-tools`); otherwise the glibc
# target linked statically
# (`-C target-feature=+crt-static`), which runs on the same hosts. Either way the binary needs no
# shared library, which is what the Functions host's Linux images require of a custom handler.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out="$root/publish"
azd=0
while (($# > 0)); do
    case $1 in
        --out) out=$2; shift 2 ;;
        --azd) azd=1; shift ;;
        *) echo "package.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

# The musl build also needs a musl C compiler: ring (TLS) compiles C for its target.
musl_cc=$(command -v x86_64-linux-musl-gcc || command -v musl-gcc || true)
if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl && [[ -n $musl_cc ]]; then
    target=x86_64-unknown-linux-musl
    rustflags=""
    export CC_x86_64_unknown_linux_musl="${CC_x86_64_unknown_linux_musl:-$musl_cc}"
else
    echo "package.sh: no musl target with a musl C compiler (rustup target add x86_64-unknown-linux-musl; apt install musl-tools); building a statically linked glibc binary" >&2
    target=x86_64-unknown-linux-gnu
    rustflags="-C target-feature=+crt-static"
fi
(cd "$root" && RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }$rustflags" cargo build --release --locked --target "$target" --bin handler)

rm -rf "$out"
mkdir -p "$out"
install -m 0755 "$root/target/$target/release/handler" "$out/handler"
install -m 0644 "$root/host.json" "$out/host.json"
for dir in "$root"/functions/*/; do
    name=$(basename "$dir")
    install -D -m 0644 "$dir/function.json" "$out/$name/function.json"
done
if [[ -f $root/local.settings.json ]]; then
    # For `func start` in the staged folder; .funcignore keeps it out of a publish.
    install -m 0600 "$root/local.settings.json" "$out/local.settings.json"
else
    # `func azure functionapp publish` reads the worker runtime from here and stops without it
    # ("Unable to determine worker runtime"); nothing else, and no secret.
    printf '{\n  "IsEncrypted": false,\n  "Values": { "FUNCTIONS_WORKER_RUNTIME": "custom" }\n}\n' >"$out/local.settings.json"
fi
cat >"$out/.funcignore" <<'IGNORE'
local.settings.json
.funcignore
*.tmp
IGNORE
if ((azd)); then
    # azd has no Rust language; as a Node project with no dependencies it zips the folder as is.
    printf '{"name":"vmss-healer","private":true,"version":"0.0.0"}\n' >"$out/package.json"
    printf 'package.json\n' >>"$out/.funcignore"
fi
echo "staged $out ($target): $(cd "$out" && find . -type f | sort | tr '\n' ' ')"
