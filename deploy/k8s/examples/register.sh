#!/usr/bin/env bash
# Registers the example workload (deploy/k8s/examples/workload.yaml) with sigil-server, through the
# server's admin CLI inside its pod (the admin socket is reachable only there).
#
# 1. A node-alias entry for every agent of the cluster: agents attested with k8s_psat in cluster
#    $CLUSTER get the node selector k8s_psat:cluster:$CLUSTER.
# 2. The workload's entry under it: pods of service account example-workload in namespace
#    sigil-example, on any node of the cluster.
#
# Usage: deploy/k8s/examples/register.sh
#   env TRUST_DOMAIN (default example.org), CLUSTER (default demo), NAMESPACE (default sigil):
#   the values of the overlay in use (deploy/k8s/overlays/example: TRUST_DOMAIN=prod.example.org
#   CLUSTER=prod-eu1).
# Running it again is harmless: existing entries are reported and kept.
set -euo pipefail

TRUST_DOMAIN="${TRUST_DOMAIN:-example.org}"
CLUSTER="${CLUSTER:-demo}"
NAMESPACE="${NAMESPACE:-sigil}"
# (not under /sigil/: that path is reserved for the server and the agents themselves)
NODES_ID="spiffe://$TRUST_DOMAIN/k8s/$CLUSTER/nodes"
WORKLOAD_ID="spiffe://$TRUST_DOMAIN/ns/sigil-example/sa/example-workload"

server() {
  kubectl -n "$NAMESPACE" exec sigil-server-0 -c sigil-server -- /usr/local/bin/sigil-server "$@"
}

create() {
  local out
  if out="$(server entry create "$@" 2>&1)"; then
    printf '%s\n' "$out"
  elif [[ "$out" == *AlreadyExists* ]]; then
    echo "already registered: $*"
  else
    printf '%s\n' "$out" >&2
    exit 1
  fi
}

create --node --spiffe-id "$NODES_ID" --selector "k8s_psat:cluster:$CLUSTER"
create --parent-id "$NODES_ID" --spiffe-id "$WORKLOAD_ID" \
  --selector k8s:ns:sigil-example --selector k8s:sa:example-workload
server entry show --spiffe-id "$WORKLOAD_ID"
