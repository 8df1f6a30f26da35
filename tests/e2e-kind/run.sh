#!/usr/bin/env bash
# End-to-end test of the mesh on a kind cluster (not run in CI: it needs a Docker engine and
# network access). Creates a two-node kind cluster (kindnet stays the primary CNI; ambient-cni
# chains after it), builds the four images from docker/ and loads them, installs the Gateway
# API v1.2.1 CRDs and `kubectl apply -k manifests/` (through a temporary overlay that points
# the images at the local builds), then deploys a client and an echo server (v1/v2) in an
# ambient namespace and asserts:
#   1. mutual TLS: the server node's ztunnel reports the client's SPIFFE identity;
#   2. an L4 DENY policy (enforced by ztunnel) refuses one client and not the other;
#   3. waypoint routing: an HTTPRoute on the Service sends `x-canary: true` to v2;
#   4. JWT at the waypoint: a request with a bad token gets 401;
#   5. admission: with a token of its pod, the node agent may set the redirection annotation on
#      a pod of its node, and may not on another node's pod, nor relabel or otherwise annotate.
# The cluster is deleted on exit (KEEP_CLUSTER=1 keeps it for debugging).
#
# Usage: tests/e2e-kind/run.sh        (env: CLUSTER_NAME, KIND_NODE_IMAGE, KEEP_CLUSTER, SKIP_BUILD)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CLUSTER_NAME=${CLUSTER_NAME:-ambient-e2e}
# Kubernetes 1.30+ puts the node name into projected tokens, which the CA needs for ztunnel.
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-kindest/node:v1.31.4}
GATEWAY_API_VERSION=v1.2.1
GATEWAY_API_CRDS="https://github.com/kubernetes-sigs/gateway-api/releases/download/${GATEWAY_API_VERSION}/standard-install.yaml"
TAG=e2e
REGISTRY=ambient-mesh
NS=e2e
ECHO_IMAGE=hashicorp/http-echo:1.0
CURL_IMAGE=curlimages/curl:8.11.1

WORK=$(mktemp -d "${TMPDIR:-/tmp}/ambient-e2e.XXXXXX")

log() { printf '\n=== %s\n' "$*"; }
fail() {
  printf 'FAIL: %s\n' "$*" >&2
  exit 1
}

cleanup() {
  status=$?
  if [ "$status" -ne 0 ]; then
    log "failed (exit $status): state for debugging"
    kubectl get pods -A -o wide 2>/dev/null || true
    kubectl -n istio-system logs -l app=mesh-controller --tail=50 2>/dev/null || true
    kubectl -n istio-system logs -l app=ztunnel --tail=50 2>/dev/null || true
    kubectl -n istio-system logs -l app=cni-agent -c cni-agent --tail=50 2>/dev/null || true
  fi
  if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
    echo "keeping cluster $CLUSTER_NAME (kind delete cluster --name $CLUSTER_NAME)"
  else
    kind delete cluster --name "$CLUSTER_NAME" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT

# retry <attempts> <command...>: every 2 s until it succeeds.
retry() {
  local attempts=$1
  shift
  local i
  for ((i = 1; i <= attempts; i++)); do
    if "$@"; then
      return 0
    fi
    sleep 2
  done
  return 1
}

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || fail "$tool is required"
done

log "kind cluster $CLUSTER_NAME ($KIND_NODE_IMAGE)"
cat >"$WORK/kind.yaml" <<'EOF'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
EOF
kind create cluster --name "$CLUSTER_NAME" --image "$KIND_NODE_IMAGE" --config "$WORK/kind.yaml" --wait 120s
kubectl config use-context "kind-$CLUSTER_NAME" >/dev/null

log "images"
for image in controller ztunnel cni waypoint; do
  if [ "${SKIP_BUILD:-0}" != 1 ]; then
    DOCKER_BUILDKIT=1 docker build -f "$ROOT/docker/$image.Dockerfile" -t "$REGISTRY/$image:$TAG" "$ROOT"
  fi
  kind load docker-image --name "$CLUSTER_NAME" "$REGISTRY/$image:$TAG"
done

log "Gateway API $GATEWAY_API_VERSION CRDs"
kubectl apply --server-side -f "$GATEWAY_API_CRDS"
kubectl wait --for condition=Established --timeout=60s crd/gateways.gateway.networking.k8s.io crd/httproutes.gateway.networking.k8s.io

log "CA root (shared by the controller replicas) and trust bundle (for ztunnel)"
mkdir -p "$WORK/ca"
docker run --rm --user "$(id -u):$(id -g)" -v "$WORK/ca:/ca" --entrypoint /usr/local/bin/ztunnel \
  "$REGISTRY/ztunnel:$TAG" --gen-dev-ca /ca
kubectl apply -f "$ROOT/manifests/namespace.yaml"
kubectl -n istio-system create secret generic mesh-ca-root \
  --from-file=root-cert.pem="$WORK/ca/root-cert.pem" --from-file=root-key.pem="$WORK/ca/root-key.pem"
kubectl -n istio-system create configmap mesh-root-cert --from-file=root-cert.pem="$WORK/ca/root-cert.pem"

log "kubectl apply -k manifests/ (overlay with the local images)"
mkdir -p "$WORK/overlay"
{
  echo "apiVersion: kustomize.config.k8s.io/v1beta1"
  echo "kind: Kustomization"
  echo "resources:"
  echo "  - $(realpath --relative-to="$WORK/overlay" "$ROOT/manifests")"
  echo "images:"
  for image in controller ztunnel cni waypoint; do
    echo "  - name: ghcr.io/ambient-mesh/$image"
    echo "    newName: $REGISTRY/$image"
    echo "    newTag: $TAG"
  done
} >"$WORK/overlay/kustomization.yaml"
kubectl apply -k "$WORK/overlay"
kubectl -n istio-system rollout status deployment/mesh-controller --timeout=180s
kubectl -n istio-system rollout status daemonset/cni-agent --timeout=180s
kubectl -n istio-system rollout status daemonset/ztunnel --timeout=180s

log "sample apps in the ambient namespace $NS"
kubectl create namespace "$NS"
kubectl label namespace "$NS" istio.io/dataplane-mode=ambient
kubectl apply -n "$NS" -f - <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: client}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: intruder}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: echo}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo-v1}
spec:
  selector: {matchLabels: {app: echo, version: v1}}
  template:
    metadata: {labels: {app: echo, version: v1}}
    spec:
      serviceAccountName: echo
      containers:
        - name: echo
          image: $ECHO_IMAGE
          args: ["-listen=:8080", "-text=v1"]
          ports: [{containerPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo-v2}
spec:
  selector: {matchLabels: {app: echo, version: v2}}
  template:
    metadata: {labels: {app: echo, version: v2}}
    spec:
      serviceAccountName: echo
      containers:
        - name: echo
          image: $ECHO_IMAGE
          args: ["-listen=:8080", "-text=v2"]
          ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-v1}
spec:
  selector: {app: echo, version: v1}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2}
spec:
  selector: {app: echo, version: v2}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client}
spec:
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      serviceAccountName: client
      containers:
        - name: curl
          image: $CURL_IMAGE
          command: [sleep, infinity]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: intruder}
spec:
  selector: {matchLabels: {app: intruder}}
  template:
    metadata: {labels: {app: intruder}}
    spec:
      serviceAccountName: intruder
      containers:
        - name: curl
          image: $CURL_IMAGE
          command: [sleep, infinity]
EOF
for d in echo-v1 echo-v2 client intruder; do
  kubectl -n "$NS" rollout status "deployment/$d" --timeout=180s
done

# curl_from <deployment> <curl args...>: runs curl in that client, prints the body.
curl_from() {
  local from=$1
  shift
  kubectl -n "$NS" exec "deploy/$from" -c curl -- curl -sS --max-time 5 "$@"
}

log "captured: the pods carry the node agent's redirection annotation"
for app in echo client; do
  pod=$(kubectl -n "$NS" get pod -l "app=$app" -o jsonpath='{.items[0].metadata.name}')
  retry 30 sh -c "kubectl -n $NS get pod $pod -o jsonpath='{.metadata.annotations.ambient\.istio\.io/redirection}' | grep -qx enabled" ||
    fail "pod $pod was not captured (ambient.istio.io/redirection != enabled)"
done

log "1. mutual TLS: the server node's ztunnel sees the client's SPIFFE identity"
retry 30 curl_from client "http://echo.$NS.svc.cluster.local/" >/dev/null || fail "client cannot reach echo"
for _ in 1 2 3 4 5; do curl_from client "http://echo.$NS.svc.cluster.local/" >/dev/null; done
identity="spiffe://cluster.local/ns/$NS/sa/client"
found=0
for node in $(kubectl -n "$NS" get pod -l app=echo -o jsonpath='{.items[*].spec.nodeName}'); do
  zt=$(kubectl -n istio-system get pod -l app=ztunnel --field-selector "spec.nodeName=$node" -o jsonpath='{.items[0].metadata.name}')
  if kubectl get --raw "/api/v1/namespaces/istio-system/pods/$zt:15020/proxy/metrics" | grep -F "$identity" | grep -q istio_tcp; then
    found=1
    echo "ztunnel $zt on $node: connections from $identity"
  fi
done
[ "$found" = 1 ] || fail "no ztunnel reports connections from $identity"

log "2. L4 DENY: intruder refused by ztunnel, client still served"
kubectl apply -n "$NS" -f - <<EOF
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-intruder}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
    - from:
        - source: {principals: ["cluster.local/ns/$NS/sa/intruder"]}
EOF
denied() { ! curl_from intruder "http://echo.$NS.svc.cluster.local/" >/dev/null 2>&1; }
retry 30 denied || fail "the DENY policy did not take effect for intruder"
curl_from client "http://echo.$NS.svc.cluster.local/" >/dev/null || fail "client refused by a policy that names intruder"
kubectl -n "$NS" delete authorizationpolicy deny-intruder

log "3. waypoint routing: x-canary: true -> v2"
kubectl apply -n "$NS" -f - <<EOF
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  labels: {istio.io/waypoint-for: service}
spec:
  gatewayClassName: istio-waypoint
  listeners:
    - {name: mesh, port: 15008, protocol: HBONE}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo}
spec:
  parentRefs:
    - {group: "", kind: Service, name: echo, port: 80}
  rules:
    - matches:
        - headers: [{name: x-canary, value: "true"}]
      backendRefs: [{name: echo-v2, port: 80}]
    - backendRefs: [{name: echo-v1, port: 80}]
EOF
retry 60 kubectl -n "$NS" get deployment waypoint >/dev/null 2>&1 || fail "the controller did not deploy the waypoint"
kubectl -n "$NS" rollout status deployment/waypoint --timeout=180s
kubectl label namespace "$NS" istio.io/use-waypoint=waypoint --overwrite
canary() { [ "$(curl_from client -H 'x-canary: true' "http://echo.$NS.svc.cluster.local/")" = v2 ]; }
stable() { [ "$(curl_from client "http://echo.$NS.svc.cluster.local/")" = v1 ]; }
retry 30 canary || fail "x-canary: true did not reach v2 through the waypoint"
for _ in $(seq 10); do
  canary || fail "x-canary: true answered by another version"
  stable || fail "a request without x-canary was not routed to v1"
done
echo "10/10 canary requests on v2, 10/10 others on v1"

log "4. JWT at the waypoint: a bad token gets 401"
kubectl apply -n "$NS" -f - <<EOF
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: echo-jwt}
spec:
  targetRefs:
    - {group: "", kind: Service, name: echo}
  jwtRules:
    - issuer: https://issuer.e2e.example
      jwks: '{"keys":[{"kty":"EC","crv":"P-256","kid":"e2e","use":"sig","alg":"ES256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}'
EOF
bad_token="eyJhbGciOiJFUzI1NiIsImtpZCI6ImUyZSJ9.eyJpc3MiOiJodHRwczovL2lzc3Vlci5lMmUuZXhhbXBsZSJ9.c2lnbmF0dXJl"
unauthorized() {
  [ "$(curl_from client -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $bad_token" "http://echo.$NS.svc.cluster.local/")" = 401 ]
}
retry 30 unauthorized || fail "a bad JWT was not answered with 401"
stable || fail "a request without a token was refused (a token is optional without an AuthorizationPolicy)"

log "5. admission: the node agent patches only its own node's pods, only the redirection annotation"
# The agent's real credentials: a token of the cni-agent service account bound to the agent pod
# of a node (Kubernetes 1.30+ names that node in it), used without the admin's certificate.
server=$(kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.server}')
kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' |
  base64 -d >"$WORK/ca.crt"
as_agent_of() {
  local node=$1 agent token
  shift
  agent=$(kubectl -n istio-system get pod -l app=cni-agent --field-selector "spec.nodeName=$node" \
    -o jsonpath='{.items[0].metadata.name}')
  token=$(kubectl -n istio-system create token cni-agent --duration 10m \
    --bound-object-kind Pod --bound-object-name "$agent")
  kubectl --kubeconfig=/dev/null --server="$server" --certificate-authority="$WORK/ca.crt" \
    --token="$token" -n "$NS" "$@"
}
refused() { # expected message, then the kubectl arguments
  local expected=$1
  shift
  if as_agent_of "$@" 2>"$WORK/refused.err"; then fail "allowed: kubectl $*"; fi
  grep -q "$expected" "$WORK/refused.err" || fail "kubectl $* refused for another reason: $(cat "$WORK/refused.err")"
  echo "refused: kubectl ${*:2}"
}
pod=$(kubectl -n "$NS" get pod -l app=client -o jsonpath='{.items[0].metadata.name}')
own=$(kubectl -n "$NS" get pod "$pod" -o jsonpath='{.spec.nodeName}')
other=$(kubectl get nodes -o jsonpath='{.items[*].metadata.name}' | tr ' ' '\n' | grep -vx "$own" | head -1)
as_agent_of "$own" annotate --overwrite pod "$pod" ambient.istio.io/redirection=enabled >/dev/null ||
  fail "the agent of $own cannot annotate a pod of its node"
refused "its own node" "$other" annotate --overwrite pod "$pod" ambient.istio.io/redirection=enabled
refused "may not change a pod's spec, labels" "$own" label pod "$pod" e2e-relabelled=yes
refused "only the ambient.istio.io/redirection annotation" "$own" annotate pod "$pod" e2e-other=yes

log "PASS: mTLS identities, L4 DENY, waypoint routing, JWT, the node agent's admission policy"
