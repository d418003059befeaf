#!/bin/sh
# Builds the `cloudllm` Debian package (cloudllmd, cloudllm, cloudllm-tray, the systemd units,
# the tray's autostart entry, shell completions) with cargo-deb, from the package definition in
# daemon/Cargo.toml ([package.metadata.deb]).
#
# Usage: packaging/debian/build.sh [PROFILE]     PROFILE: release (default) or dev
# Prints the path of the .deb. Needs `cargo install cargo-deb --locked`.
set -eu
cd "$(dirname "$0")/../.."

profile="${1:-release}"
# A dev package (for tests) takes the fast compression: a bigger file, seconds instead of 20.
case "$profile" in
    release) dir=release fast= ;;
    dev) dir=debug fast=--fast ;;
    *) echo "usage: $0 [release|dev]" >&2; exit 2 ;;
esac
target="${CARGO_TARGET_DIR:-target}"
out="$target/$dir"

cargo build --quiet --profile "$profile" -p cloudllm-daemon -p cloudllm-cli -p cloudllm-tray
# Completions come from the CLI itself, so they always match its commands.
mkdir -p "$out/completions"
"$out/cloudllm" completions bash > "$out/completions/cloudllm.bash"
"$out/cloudllm" completions zsh > "$out/completions/_cloudllm"
"$out/cloudllm" completions fish > "$out/completions/cloudllm.fish"
mkdir -p "$target/debian"
cargo deb --quiet -p cloudllm-daemon --no-build --profile "$profile" $fast --output "$target/debian/"
