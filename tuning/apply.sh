#!/usr/bin/env bash
# Apply shardmq's host settings (tuning/README.md explains each).
#   tuning/apply.sh            apply sysctls now and raise this shell's limits
#   tuning/apply.sh --dry-run  print what would change
#   tuning/apply.sh --persist  also install sysctl.d and limits.d files
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dry=0; persist=0
for a in "$@"; do
  case "$a" in
    --dry-run) dry=1 ;;
    --persist) persist=1 ;;
    *) echo "usage: $0 [--dry-run] [--persist]" >&2; exit 2 ;;
  esac
done
if [ "$dry" = 0 ] && [ "$(id -u)" != 0 ]; then
  echo "apply.sh: run as root (or use --dry-run)" >&2; exit 1
fi

while IFS='=' read -r key value; do
  key="$(echo "$key" | xargs)"; value="$(echo "$value" | xargs)"
  [ -z "$key" ] || [ "${key#\#}" != "$key" ] && continue
  path="/proc/sys/${key//.//}"
  if [ ! -e "$path" ]; then echo "skip $key (not on this kernel)"; continue; fi
  now="$(xargs < "$path")"
  if [ "$now" = "$value" ]; then continue; fi
  echo "$key: $now -> $value"
  [ "$dry" = 1 ] || sysctl -q -w "$key=$value" || echo "  could not set $key (container?)"
done < <(grep -v '^\s*#' "$here/sysctl.conf" | grep '=')

echo "open files (ulimit -n): $(ulimit -n) soft / $(ulimit -Hn) hard"
echo "locked memory (ulimit -l): $(ulimit -l) KiB"
if [ "$dry" = 0 ]; then
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  ulimit -l unlimited 2>/dev/null || echo "  could not raise memlock in this shell"
fi

if [ "$persist" = 1 ] && [ "$dry" = 0 ]; then
  install -m 0644 "$here/sysctl.conf" /etc/sysctl.d/60-shardmq.conf
  install -m 0644 "$here/limits.conf" /etc/security/limits.d/60-shardmq.conf
  echo "installed /etc/sysctl.d/60-shardmq.conf and /etc/security/limits.d/60-shardmq.conf"
fi
