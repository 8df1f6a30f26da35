#!/usr/bin/env bash
# Installs the system packages the tests, the demo and the benchmark use (Debian/Ubuntu).
# Idempotent: packages already present are not reinstalled.
set -euo pipefail

packages=(
  iproute2          # ip netns / veth / bridge: the network-namespace test bed
  nftables          # capture rules inside pod namespaces
  curl              # a real HTTP client in the tests and the demo
  tcpdump           # captures on the test underlay: mesh traffic must never be in clear
  util-linux        # nsenter: the node agent writes rules inside pod namespaces
  containernetworking-plugins  # reference CNI plugins (bridge, host-local) the tests chain after
  procps            # sysctl
  jq inotify-tools  # docker/cni/install-cni.sh (run by cni-plugin/tests/install_cni.rs): conflist edits, inotifywait
  prometheus        # promtool: validates the metrics text format
  iperf3 wrk apache2-utils nginx-light   # benchmark tools and backend
  python3 python3-pip  # scripts/validate-manifests.sh (its PyPI packages are installed below)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Python packages for scripts/validate-manifests.sh (offline Kubernetes schemas, pinned; a CEL
# interpreter for the admission policies).
python3 -c 'import importlib.metadata as m, sys; sys.exit(not (m.version("kubernetes-validate") == "1.37.0" and m.version("cel-python") == "0.5.0" and m.version("jsonschema") and m.version("PyYAML")))' 2>/dev/null ||
  { python3 -m pip install -q --disable-pip-version-check "kubernetes-validate==1.37.0" "cel-python==0.5.0" "jsonschema>=4.18" "PyYAML>=6" ||
    python3 -m pip install -q --disable-pip-version-check --break-system-packages \
      "kubernetes-validate==1.37.0" "cel-python==0.5.0" "jsonschema>=4.18" "PyYAML>=6"; }
