#!/bin/sh
# Installs the ambient CNI plugin on a node, keeps it installed, and removes it on uninstall.
# Runs inside the cni-agent DaemonSet (manifests/cni/daemonset.yaml) with the node's CNI
# directories mounted at $CNI_BIN_DIR and $CNI_NET_DIR.
#
#   install-cni.sh install    copy ambient-cni into the node's CNI bin dir and insert it into
#                             the first *.conflist of the node's CNI config dir (waits for one)
#   install-cni.sh watch      install, then re-check every $WATCH_INTERVAL seconds (the primary
#                             CNI, kindnet for instance, may rewrite its conflist on restart)
#   install-cni.sh prestop    the container's preStop hook: uninstall only when asked to
#                             (see below), otherwise leave everything in place
#   install-cni.sh uninstall  remove our entry from every conflist, then the binary
#
# Uninstall versus upgrade: the plugin fails a pod's ADD while no agent answers (a pod must
# never start unmeshed), so it must stay in the chain while the agent restarts or is upgraded
# and go away only when the mesh is removed. The preStop hook therefore removes it only when
# $UNINSTALL is "true" or the file $UNINSTALL_FLAG_FILE (the `uninstall` key of the ConfigMap
# ambient-cni, mounted as a volume so a change reaches running pods) says "true".
# While uninstall is requested, `install` and `watch` remove instead of install (so the watch
# loop cannot put back what the preStop hook just removed).
#
# Every change is idempotent and atomic: the conflist is rewritten through a temporary file in
# the same directory (a dot-file without a .conf/.conflist suffix, which runtimes ignore) and a
# rename, and only when its content would change.
set -eu

CNI_BIN_DIR=${CNI_BIN_DIR:-/host/opt/cni/bin}
CNI_NET_DIR=${CNI_NET_DIR:-/host/etc/cni/net.d}
PLUGIN_SRC=${PLUGIN_SRC:-/usr/local/bin/ambient-cni}
PLUGIN_TYPE=ambient-cni
AGENT_SOCKET=${AGENT_SOCKET:-/var/run/ambient/cni.sock}
AGENT_TIMEOUT_MS=${AGENT_TIMEOUT_MS:-2000}
CONFLIST_WAIT_SECONDS=${CONFLIST_WAIT_SECONDS:-600}
WATCH_INTERVAL=${WATCH_INTERVAL:-10}
UNINSTALL=${UNINSTALL:-false}
UNINSTALL_FLAG_FILE=${UNINSTALL_FLAG_FILE:-/etc/ambient-cni/uninstall}

log() {
  echo "install-cni: $*" >&2
}

# The first *.conflist in the config dir, in the runtime's (lexical) order; empty if none.
first_conflist() {
  for f in "$CNI_NET_DIR"/*.conflist; do
    if [ -f "$f" ]; then
      echo "$f"
      return 0
    fi
  done
  return 0
}

# Writes stdin to $1 atomically, keeping its mode.
write_atomic() {
  target=$1
  tmp="$(dirname "$target")/.$(basename "$target").ambient-tmp"
  cat >"$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$target"
}

install_binary() {
  if [ -f "$CNI_BIN_DIR/$PLUGIN_TYPE" ] && cmp -s "$PLUGIN_SRC" "$CNI_BIN_DIR/$PLUGIN_TYPE"; then
    return 0
  fi
  cp "$PLUGIN_SRC" "$CNI_BIN_DIR/.$PLUGIN_TYPE.ambient-tmp"
  chmod 0755 "$CNI_BIN_DIR/.$PLUGIN_TYPE.ambient-tmp"
  mv -f "$CNI_BIN_DIR/.$PLUGIN_TYPE.ambient-tmp" "$CNI_BIN_DIR/$PLUGIN_TYPE"
  log "installed $CNI_BIN_DIR/$PLUGIN_TYPE"
}

# Puts exactly one entry of ours at the end of `plugins` (after the primary plugin and its
# chained plugins), replacing an outdated one; rewrites the file only if that changes it.
insert_entry() {
  conflist=$1
  desired=$(jq \
    --arg type "$PLUGIN_TYPE" \
    --arg socket "$AGENT_SOCKET" \
    --argjson timeout "$AGENT_TIMEOUT_MS" \
    '.plugins = ([.plugins[] | select(.type != $type)]
                 + [{type: $type, agentSocket: $socket, agentTimeoutMs: $timeout}])' \
    "$conflist")
  # Compared in canonical form (sorted keys, no whitespace); the file keeps its key order.
  if [ "$(jq -cS . "$conflist")" = "$(printf '%s' "$desired" | jq -cS .)" ]; then
    return 0
  fi
  printf '%s\n' "$desired" | write_atomic "$conflist"
  log "inserted $PLUGIN_TYPE into $conflist"
}

remove_entries() {
  for conflist in "$CNI_NET_DIR"/*.conflist; do
    [ -f "$conflist" ] || continue
    if jq -e --arg type "$PLUGIN_TYPE" '[.plugins[]? | select(.type == $type)] | length > 0' \
      "$conflist" >/dev/null 2>&1; then
      jq --arg type "$PLUGIN_TYPE" '.plugins = [.plugins[] | select(.type != $type)]' "$conflist" |
        write_atomic "$conflist"
      log "removed $PLUGIN_TYPE from $conflist"
    fi
  done
}

ensure_installed() {
  install_binary
  conflist=$(first_conflist)
  waited=0
  while [ -z "$conflist" ]; do
    if [ "$waited" -ge "$CONFLIST_WAIT_SECONDS" ]; then
      log "no *.conflist in $CNI_NET_DIR after ${CONFLIST_WAIT_SECONDS}s: is the primary CNI installed?"
      return 1
    fi
    if [ $((waited % 30)) -eq 0 ]; then
      log "waiting for the primary CNI's *.conflist in $CNI_NET_DIR"
    fi
    sleep 2
    waited=$((waited + 2))
    conflist=$(first_conflist)
  done
  insert_entry "$conflist"
}

uninstall() {
  # Entry first, binary second: a conflist naming a missing binary fails every pod's ADD.
  remove_entries
  if [ -e "$CNI_BIN_DIR/$PLUGIN_TYPE" ]; then
    rm -f "$CNI_BIN_DIR/$PLUGIN_TYPE"
    log "removed $CNI_BIN_DIR/$PLUGIN_TYPE"
  fi
}

uninstall_requested() {
  [ "$UNINSTALL" = "true" ] && return 0
  [ -f "$UNINSTALL_FLAG_FILE" ] && [ "$(tr -d '[:space:]' <"$UNINSTALL_FLAG_FILE")" = "true" ]
}

mode=${1:-install}
case "$mode" in
  install)
    if uninstall_requested; then
      uninstall
    else
      ensure_installed
    fi
    ;;
  watch)
    trap 'exit 0' TERM INT
    while :; do
      if uninstall_requested; then
        uninstall
      else
        ensure_installed || true
      fi
      sleep "$WATCH_INTERVAL" &
      wait $! || true
    done
    ;;
  prestop)
    if uninstall_requested; then
      log "uninstall requested: removing the plugin"
      uninstall
    else
      log "keeping the plugin in place (restart or upgrade; set the uninstall flag to remove it)"
    fi
    ;;
  uninstall)
    uninstall
    ;;
  *)
    echo "usage: $0 install|watch|prestop|uninstall" >&2
    exit 2
    ;;
esac
