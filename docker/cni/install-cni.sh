#!/usr/bin/env bash
# Installs the ambient CNI plugin on a node, keeps it in the file the container runtime reads,
# and removes it when the mesh is removed. Runs inside the cni-agent DaemonSet
# (manifests/cni/daemonset.yaml); every path comes from the environment, so it also runs
# outside a container (cni-plugin/tests/install_cni.rs runs it against temp-dir layouts).
#
#   install-cni.sh install    copy ambient-cni into $CNI_BIN_DIR and put our entry into the
#                             config file the runtime reads (waits for the primary CNI's file)
#   install-cni.sh watch      install, then keep it there: re-check on every change of
#                             $CNI_NET_DIR (inotifywait) or every $POLL_INTERVAL s without it;
#                             on SIGTERM remove the plugin if the mesh is being removed
#   install-cni.sh uninstall  remove our entry from every conflist, then the binary
#
# Which file: like libcni's ConfFiles and containerd/CRI-O, the runtime reads the lexically
# first (byte order) regular file of $CNI_NET_DIR ending in .conf, .conflist or .json. A
# .conflist gets our entry appended to `plugins`. A .conf/.json holds a single plugin, which
# cannot be chained: it is rewritten as <name>.conflist (the plugin wrapped in `plugins`, as
# Istio's install-cni does) and the .conf/.json removed. That is done only when <name>.conflist
# then is the first file (it is unless another config file sorts between the two names);
# otherwise nothing is touched and the script fails loudly, because any other outcome leaves
# the runtime reading a file without our entry.
#
# Every write keeps the file's mode and is atomic: a temporary dot-file in the same directory
# (its name ends in no config extension, so runtimes ignore it) renamed over the target, and
# only when the content would change.
#
# Uninstall versus upgrade: the plugin fails a pod's ADD while no agent answers (kube-system,
# istio-system and excluded namespaces aside), so it must stay in the chain while the agent
# restarts or is upgraded and go away only when the mesh is removed. On SIGTERM the watch
# removes it when (a) $UNINSTALL or the file $UNINSTALL_FLAG_FILE (the ConfigMap ambient-cni)
# says "true", or (b) the DaemonSet $DAEMONSET_NAME is gone or being deleted: asked of the API
# server with the pod's service-account token (404, a deletionTimestamp, or 401/403 because
# the mesh's service account or its grant was deleted with it); any other answer or no answer
# keeps the plugin (a rolling update must never open a window of unmeshed pods). Without an
# API server (local runs), $DAEMONSET_STATE_FILE answers instead: present|deleting|absent.
set -euo pipefail
export LC_ALL=C # glob order = byte order, as Go's sort.Strings

CNI_BIN_DIR=${CNI_BIN_DIR:-/host/opt/cni/bin}
CNI_NET_DIR=${CNI_NET_DIR:-/host/etc/cni/net.d}
PLUGIN_SRC=${PLUGIN_SRC:-/usr/local/bin/ambient-cni}
PLUGIN_TYPE=ambient-cni
AGENT_SOCKET=${AGENT_SOCKET:-/var/run/ambient/cni.sock}
AGENT_TIMEOUT_MS=${AGENT_TIMEOUT_MS:-2000}
# Comma-separated namespaces the plugin passes through without the agent (on top of
# kube-system and istio-system, which it always passes through).
EXCLUDE_NAMESPACES=${EXCLUDE_NAMESPACES:-}
CONFIG_WAIT_SECONDS=${CONFIG_WAIT_SECONDS:-600}
WATCH_MODE=${WATCH_MODE:-auto} # auto (inotify if inotifywait is installed) | inotify | poll
POLL_INTERVAL=${POLL_INTERVAL:-0.5}
# With inotify, a full re-check also runs this often without any event.
RECHECK_SECONDS=${RECHECK_SECONDS:-30}
UNINSTALL=${UNINSTALL:-false}
UNINSTALL_FLAG_FILE=${UNINSTALL_FLAG_FILE:-/etc/ambient-cni/uninstall}
DAEMONSET_NAME=${DAEMONSET_NAME:-cni-agent}
POD_NAMESPACE=${POD_NAMESPACE:-istio-system}
DAEMONSET_STATE_FILE=${DAEMONSET_STATE_FILE:-}
SA_DIR=${SA_DIR:-/var/run/secrets/kubernetes.io/serviceaccount}
if [ -z "${KUBE_API_URL:-}" ] && [ -n "${KUBERNETES_SERVICE_HOST:-}" ]; then
  host=$KUBERNETES_SERVICE_HOST
  case "$host" in *:*) host="[$host]" ;; esac
  KUBE_API_URL="https://$host:${KUBERNETES_SERVICE_PORT:-443}"
fi
KUBE_API_URL=${KUBE_API_URL:-}

log() {
  echo "install-cni: $*" >&2
}

# The config file the runtime reads: the first regular file with a config extension; empty
# output if there is none.
runtime_config() {
  local f
  for f in "$CNI_NET_DIR"/*; do
    case "$f" in
      *.conf | *.conflist | *.json)
        if [ -f "$f" ]; then
          echo "$f"
          return 0
        fi
        ;;
    esac
  done
}

# Writes stdin to $1 atomically with mode $2 (octal).
write_atomic() {
  local target=$1 mode=$2 tmp
  tmp=$(mktemp "$(dirname "$target")/.ambient-cni.XXXXXX") || return 1
  if cat >"$tmp" && chmod "$mode" "$tmp" && mv -f "$tmp" "$target"; then
    return 0
  fi
  rm -f "$tmp"
  return 1
}

install_binary() {
  local dst="$CNI_BIN_DIR/$PLUGIN_TYPE" tmp
  if [ -f "$dst" ] && cmp -s "$PLUGIN_SRC" "$dst"; then
    return 0
  fi
  tmp=$(mktemp "$CNI_BIN_DIR/.$PLUGIN_TYPE.XXXXXX") || return 1
  if cp "$PLUGIN_SRC" "$tmp" && chmod 0755 "$tmp" && mv -f "$tmp" "$dst"; then
    log "installed $dst"
    return 0
  fi
  rm -f "$tmp"
  return 1
}

# Our plugin entry as JSON.
our_entry() {
  jq -cn --arg type "$PLUGIN_TYPE" --arg socket "$AGENT_SOCKET" \
    --argjson timeout "$AGENT_TIMEOUT_MS" --arg exclude "$EXCLUDE_NAMESPACES" \
    '{type: $type, agentSocket: $socket, agentTimeoutMs: $timeout}
     + (($exclude | split(",") | map(select(. != ""))) as $ns
        | if ($ns | length) > 0 then {excludeNamespaces: $ns} else {} end)'
}

# The conflist $1 with exactly one entry of ours, at the end of `plugins` (after the primary
# plugin and its chained plugins). A single-plugin config (.conf/.json) is wrapped first.
desired_conflist() {
  local entry
  entry=$(our_entry) || return 1
  jq --argjson entry "$entry" '
    (if has("plugins") then .
     else {cniVersion: .cniVersion, name: .name, plugins: [del(.cniVersion, .name)]}
          | with_entries(select(.value != null))
     end)
    | .plugins = ([.plugins[] | select(.type != $entry.type)] + [$entry])' "$1"
}

# Puts our entry into the conflist $1, rewriting it only if that changes it.
insert_entry() {
  local conflist=$1 desired mode
  desired=$(desired_conflist "$conflist") || return 1
  # Compared in canonical form (sorted keys); the file keeps its key order.
  if [ "$(jq -cS . "$conflist")" = "$(printf '%s' "$desired" | jq -cS .)" ]; then
    return 0
  fi
  mode=$(stat -c %a "$conflist") || return 1
  printf '%s\n' "$desired" | write_atomic "$conflist" "$mode" || return 1
  log "inserted $PLUGIN_TYPE into $conflist"
}

# Rewrites the single-plugin config $1 as <name>.conflist with our entry and removes $1, if
# <name>.conflist is then the file the runtime reads.
convert_conf() {
  local src=$1 target desired mode f
  target="${src%.*}.conflist"
  for f in "$CNI_NET_DIR"/*; do
    [ "$f" = "$src" ] && continue
    case "$f" in *.conf | *.conflist | *.json) [ -f "$f" ] || continue ;; *) continue ;; esac
    if [[ "$f" < "$target" ]]; then
      log "ERROR: the runtime reads $src, a single-plugin config that cannot be chained, and" \
        "$(basename "$target") would not be read instead ($(basename "$f") sorts before it):" \
        "rename one of them; pods of this node are not captured until then"
      return 1
    fi
  done
  desired=$(desired_conflist "$src") || return 1
  mode=$(stat -c %a "$src") || return 1
  # The conflist first, then the .conf: the runtime never finds no config at all.
  printf '%s\n' "$desired" | write_atomic "$target" "$mode" || return 1
  rm -f "$src" || return 1
  log "converted $src into $target with $PLUGIN_TYPE"
}

# One pass: our binary in place, our entry in the file the runtime reads. Fails (1) when
# there is no config file yet, or on any error.
reconcile() {
  local conf
  install_binary || return 1
  conf=$(runtime_config)
  case "$conf" in
    "") return 1 ;;
    *.conflist) insert_entry "$conf" ;;
    *) convert_conf "$conf" ;;
  esac
}

ensure_installed() {
  local waited=0
  while [ -z "$(runtime_config)" ]; do
    if [ "$waited" -ge "$CONFIG_WAIT_SECONDS" ]; then
      log "no .conf/.conflist/.json in $CNI_NET_DIR after ${CONFIG_WAIT_SECONDS}s: is the primary CNI installed?"
      return 1
    fi
    if [ $((waited % 30)) -eq 0 ]; then
      log "waiting for the primary CNI's config in $CNI_NET_DIR"
    fi
    sleep 1
    waited=$((waited + 1))
  done
  reconcile
}

remove_entries() {
  local conflist mode
  for conflist in "$CNI_NET_DIR"/*.conflist; do
    [ -f "$conflist" ] || continue
    if jq -e --arg type "$PLUGIN_TYPE" '[.plugins[]? | select(.type == $type)] | length > 0' \
      "$conflist" >/dev/null 2>&1; then
      mode=$(stat -c %a "$conflist") || return 1
      jq --arg type "$PLUGIN_TYPE" '.plugins = [.plugins[] | select(.type != $type)]' "$conflist" |
        write_atomic "$conflist" "$mode" || return 1
      log "removed $PLUGIN_TYPE from $conflist"
    fi
  done
}

uninstall() {
  # Entry first, binary second: a conflist naming a missing binary fails every pod's ADD.
  remove_entries || return 1
  if [ -e "$CNI_BIN_DIR/$PLUGIN_TYPE" ]; then
    rm -f "$CNI_BIN_DIR/$PLUGIN_TYPE"
    log "removed $CNI_BIN_DIR/$PLUGIN_TYPE"
  fi
}

uninstall_requested() {
  [ "$UNINSTALL" = "true" ] && return 0
  [ -f "$UNINSTALL_FLAG_FILE" ] && [ "$(tr -d '[:space:]' <"$UNINSTALL_FLAG_FILE")" = "true" ]
}

# Whether our DaemonSet is gone or being deleted (0), rather than present or unknown (1).
daemonset_removed() {
  if [ -n "$DAEMONSET_STATE_FILE" ]; then
    case "$(tr -d '[:space:]' <"$DAEMONSET_STATE_FILE" 2>/dev/null)" in
      absent | deleting) return 0 ;;
      *) return 1 ;;
    esac
  fi
  if [ -z "$KUBE_API_URL" ] || [ ! -r "$SA_DIR/token" ]; then
    log "no API server to ask whether DaemonSet $DAEMONSET_NAME still exists: keeping the plugin"
    return 1
  fi
  local out code body
  out=$(curl -sS --max-time 5 --cacert "$SA_DIR/ca.crt" \
    -H "Authorization: Bearer $(cat "$SA_DIR/token")" -w '\n%{http_code}' \
    "$KUBE_API_URL/apis/apps/v1/namespaces/$POD_NAMESPACE/daemonsets/$DAEMONSET_NAME" 2>&1) || {
    log "asking the API server for DaemonSet $DAEMONSET_NAME failed ($out): keeping the plugin"
    return 1
  }
  code=${out##*$'\n'}
  body=${out%$'\n'*}
  case "$code" in
    404 | 401 | 403)
      log "DaemonSet $DAEMONSET_NAME: HTTP $code (deleted, or its service account or grant is): the mesh is being removed"
      return 0
      ;;
    200)
      if printf '%s' "$body" | jq -e '.metadata.deletionTimestamp != null' >/dev/null 2>&1; then
        log "DaemonSet $DAEMONSET_NAME is being deleted"
        return 0
      fi
      return 1
      ;;
    *)
      log "DaemonSet $DAEMONSET_NAME: HTTP $code: keeping the plugin"
      return 1
      ;;
  esac
}

# SIGTERM of the watch: stop watching, then remove the plugin only if the mesh goes away.
# The trap only sets a flag; the loops act on it between steps (a trap that runs commands
# while `read -t` waits can be abandoned halfway by bash).
terminating=0
on_term() {
  [ "$terminating" -eq 1 ] || return 0
  trap - TERM INT
  if [ -n "${watcher_pid:-}" ]; then kill "$watcher_pid" 2>/dev/null || true; fi
  if uninstall_requested || daemonset_removed; then
    log "terminating, mesh removed: removing the plugin"
    uninstall || exit 1
  else
    log "terminating, DaemonSet still present (restart or upgrade): keeping the plugin in place"
  fi
  exit 0
}

# One reaction to a change: remove while uninstall is requested (so the watch cannot put
# back what an uninstall removed), install otherwise.
react() {
  if uninstall_requested; then
    uninstall || true
  else
    reconcile || true
  fi
}

watch_poll() {
  log "watching $CNI_NET_DIR every ${POLL_INTERVAL}s (poll)"
  while :; do
    on_term
    react
    on_term
    sleep "$POLL_INTERVAL" &
    wait $! || true
  done
}

# inotifywait in monitor mode: events that arrive while a reaction runs queue up in the pipe
# and are never lost; a burst is coalesced into one reaction.
watch_inotify() {
  local dirs=("$CNI_NET_DIR") line fd rc
  [ -d "$(dirname "$UNINSTALL_FLAG_FILE")" ] && dirs+=("$(dirname "$UNINSTALL_FLAG_FILE")")
  exec {fd}< <(exec inotifywait -m -e close_write,moved_to,moved_from,create,delete,attrib \
    --format '%w%f' "${dirs[@]}" 2>&1)
  watcher_pid=$!
  # React only once the watches are in place, so no change can slip in between.
  while IFS= read -r -u "$fd" line; do
    [ "$line" = "Watches established." ] && break
  done
  log "watching $CNI_NET_DIR with inotify"
  while :; do
    on_term
    react
    on_term
    rc=0
    IFS= read -r -t "$RECHECK_SECONDS" -u "$fd" line || rc=$?
    on_term
    if [ "$rc" -ne 0 ] && [ "$rc" -le 128 ]; then
      log "inotifywait exited: falling back to polling"
      watch_poll
    fi
    while IFS= read -r -t 0.02 -u "$fd" line; do :; done
  done
}

mode=${1:-install}
case "$mode" in
  install)
    if uninstall_requested; then
      uninstall
    else
      install_binary
      ensure_installed
    fi
    ;;
  watch)
    watcher_pid=
    trap 'terminating=1' TERM INT
    case "$WATCH_MODE" in
      poll) watch_poll ;;
      inotify) watch_inotify ;;
      *) if command -v inotifywait >/dev/null; then watch_inotify; else watch_poll; fi ;;
    esac
    ;;
  uninstall)
    uninstall
    ;;
  *)
    echo "usage: $0 install|watch|uninstall" >&2
    exit 2
    ;;
esac
