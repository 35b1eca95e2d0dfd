#!/usr/bin/env bash
# Installs vmss-healer-agent as a systemd service. Used by the Custom Script Extension and by the
# cloud-init snippet; both put this file next to `vmss-healer-agent` and
# `vmss-healer-agent.service`.
#
#   install.sh --topic <…/api/events URL> [--health-url URL | --health-command CMD]
#              [--health-timeout 5] [--interval 60] [--schema eventgrid|cloudevents]
#              [--attest] [--drain-command CMD] [--drain-file PATH] [--require-mount PATHS]
#              [--root DIR] [--no-start]
#
# --root installs under another root (tests, image builds); --no-start leaves the service stopped.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root="" start=1 attest=false topic="" health_url="" health_command="" health_timeout=5 interval=60 schema=eventgrid
drain_command="" drain_file="" require_mount=""
while (($# > 0)); do
    case $1 in
        --topic) topic=$2; shift 2 ;;
        --health-url) health_url=$2; shift 2 ;;
        --health-command) health_command=$2; shift 2 ;;
        --health-timeout) health_timeout=$2; shift 2 ;;
        --interval) interval=$2; shift 2 ;;
        --schema) schema=$2; shift 2 ;;
        --root) root=$2; shift 2 ;;
        --attest) attest=true; shift ;;
        --drain-command) drain_command=$2; shift 2 ;;
        --drain-file) drain_file=$2; shift 2 ;;
        --require-mount) require_mount=$2; shift 2 ;;
        --no-start) start=0; shift ;;
        *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ -n $topic ]] || { echo "install.sh: --topic is required" >&2; exit 2; }
for f in vmss-healer-agent vmss-healer-agent.service; do
    [[ -f $here/$f ]] || { echo "install.sh: $here/$f is missing" >&2; exit 1; }
done

# Values are written as systemd environment assignments: quote them, escaping \ and ".
quote() { local v=${1//\\/\\\\}; printf '"%s"' "${v//\"/\\\"}"; }

install -D -m 0755 "$here/vmss-healer-agent" "$root/usr/local/bin/vmss-healer-agent"
install -D -m 0644 "$here/vmss-healer-agent.service" "$root/etc/systemd/system/vmss-healer-agent.service"
install -d -m 0755 "$root/etc/vmss-healer"
{
    echo "# written by vmss-healer install.sh"
    echo "HEALER_TOPIC_ENDPOINT=$(quote "$topic")"
    [[ -n $health_url ]] && echo "HEALER_HEALTH_URL=$(quote "$health_url")"
    [[ -n $health_command ]] && echo "HEALER_HEALTH_COMMAND=$(quote "$health_command")"
    echo "HEALER_HEALTH_TIMEOUT=$(quote "$health_timeout")"
    echo "HEALER_INTERVAL=$(quote "$interval")"
    echo "HEALER_SCHEMA=$(quote "$schema")"
    echo "HEALER_ATTEST=$(quote "$attest")"
    [[ -n $drain_command ]] && echo "HEALER_DRAIN_COMMAND=$(quote "$drain_command")"
    [[ -n $drain_file ]] && echo "HEALER_DRAIN_FILE=$(quote "$drain_file")"
    [[ -n $require_mount ]] && echo "HEALER_REQUIRE_MOUNT=$(quote "$require_mount")"
} >"$root/etc/vmss-healer/agent.env.tmp"
chmod 0644 "$root/etc/vmss-healer/agent.env.tmp"
mv "$root/etc/vmss-healer/agent.env.tmp" "$root/etc/vmss-healer/agent.env"

if ((start)) && [[ -z $root ]]; then
    systemctl daemon-reload
    systemctl enable vmss-healer-agent.service
    systemctl restart vmss-healer-agent.service
    echo "vmss-healer-agent installed and started; logs: journalctl -u vmss-healer-agent"
else
    echo "vmss-healer-agent installed under ${root:-/} (not started)"
fi
