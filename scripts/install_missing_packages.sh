#!/usr/bin/env bash
# Installs those of the named Debian packages that are not installed yet (none: does nothing), without
# a terminal (CI has no stdin), through sudo when not root. Shared by setup.sh and fuzz.sh.
# Usage: scripts/install_missing_packages.sh WHO PACKAGE...   (WHO prefixes the message: "setup")
set -euo pipefail
who="$1"
shift
missing=()
for p in "$@"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then missing+=("$p"); fi
done
((${#missing[@]})) || exit 0
echo "$who: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
