#!/usr/bin/env bash
# Vendor the browser client's third-party code into gateway/static/ at a pinned version.
#
# The gateway serves gateway/static/ flat (/static/<name>), so each vendored file sits
# there directly, next to its licence and a version note. Today that is one library:
# @msgpack/msgpack, whose published single-file browser build (dist.umd/msgpack.min.js,
# it defines window.MessagePack) the client loads for the presence.v1.msgpack subprotocol.
#
#   bash config/dev/fetch-vendor.sh          # npm pack the pinned version, verify, install
#   bash config/dev/fetch-vendor.sh --check  # verify the vendored files only (no network)
#
# To upgrade: change VERSION, run once with the new version to see the new sums
# (it stops on a mismatch and prints them), review the diff of the package, update the sums.
set -euo pipefail
cd "$(dirname "$0")/../.."

PACKAGE="@msgpack/msgpack"
VERSION="3.1.3"
# sha256 of the tarball npm serves for that version, and of the files taken from it.
TARBALL_SHA256="1fef5cd691fbe3ea2695ca12c8c01a5c2c50e7014486d32037e0242c1c24bd36"
FILE_SHA256="3e7ae27410846ac09f94674bd7b91133d6e59bd3c02508080c4139c1386b359b"
LICENSE_SHA256="d95a411bcdadac85d678a99367ff51719e53539fa5ee9994943cd760c4ae64e4"

DEST="gateway/static"
FILE="msgpack.min.js"
LICENSE="msgpack.LICENSE.txt"
NOTE="msgpack.VERSION.txt"

sha256() { sha256sum "$1" | cut -d' ' -f1; }

expect_sum() { # file, expected sum
    local got
    got=$(sha256 "$1")
    if [ "$got" != "$2" ]; then
        echo "fetch-vendor: sha256 mismatch for $1" >&2
        echo "  expected $2" >&2
        echo "  got      $got" >&2
        return 1
    fi
}

if [ "${1:-}" = "--check" ]; then
    expect_sum "$DEST/$FILE" "$FILE_SHA256"
    expect_sum "$DEST/$LICENSE" "$LICENSE_SHA256"
    grep -qx "version: $VERSION" "$DEST/$NOTE" || {
        echo "fetch-vendor: $DEST/$NOTE does not name version $VERSION" >&2
        exit 1
    }
    echo "fetch-vendor: $PACKAGE@$VERSION in $DEST is intact"
    exit 0
fi

command -v npm >/dev/null || { echo "fetch-vendor: npm is required" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# npm pack checks the tarball against the registry's integrity field; we check it again
# against our own pin, so that a re-published or tampered version cannot slip in.
tarball=$(npm pack --silent --pack-destination "$work" "$PACKAGE@$VERSION" | tail -n1)
expect_sum "$work/$tarball" "$TARBALL_SHA256"
tar -xzf "$work/$tarball" -C "$work" package/dist.umd/msgpack.min.js package/LICENSE
expect_sum "$work/package/dist.umd/msgpack.min.js" "$FILE_SHA256"
expect_sum "$work/package/LICENSE" "$LICENSE_SHA256"

install -m 0644 "$work/package/dist.umd/msgpack.min.js" "$DEST/$FILE"
install -m 0644 "$work/package/LICENSE" "$DEST/$LICENSE"
cat > "$DEST/$NOTE" <<NOTE_EOF
package: $PACKAGE
version: $VERSION
licence: ISC ($LICENSE)
source: https://registry.npmjs.org/$PACKAGE/-/msgpack-$VERSION.tgz
file: package/dist.umd/msgpack.min.js, unmodified
sha256: $FILE_SHA256
fetched by: config/dev/fetch-vendor.sh
NOTE_EOF
echo "fetch-vendor: installed $PACKAGE@$VERSION into $DEST ($FILE, $LICENSE, $NOTE)"
