#!/bin/sh
# Make the certificates of deploy/kubernetes/tls with `kvstore cert` (pip install kvstore, or run
# this inside the image: podman run --rm -v "$PWD:/out" --user 0 --entrypoint sh IMAGE -c '...'):
#
#   deploy/kubernetes/tls/make-certs.sh DIR [NAMESPACE] [REPLICAS]
#   kubectl -n NAMESPACE create secret generic kvstore-tls --from-file=DIR/secret
#
# DIR/ca/ca.key is the cluster's CA key: keep it OUT of the cluster (it signs new members' and
# clients' certificates). DIR/secret holds what the pods need, as flat files (a Secret's keys):
#   ca.crt                          the CA certificate
#   kvstore-N.node.crt / .key       pod kvstore-N's node certificate (node id N+1; its names:
#                                   kvstore-N.kvstore-peer[.NS.svc[.cluster.local]], the client
#                                   Service kvstore[.NS.svc[.cluster.local]], localhost, 127.0.0.1)
#   client.root.crt / .key          user root, for `kubectl exec kvstore-0 -- kvctl ...`
# DIR/client/ holds ca.crt and client.root.* for kvctl outside the cluster (--certs-dir).
# Existing files are kept: run it again with more REPLICAS to add the new pods' certificates.
set -eu
dir=${1:?usage: make-certs.sh DIR [NAMESPACE] [REPLICAS]}
ns=${2:-default}
replicas=${3:-3}
case $replicas in *[!0-9]*|'') echo "make-certs.sh: REPLICAS must be a number, not '$replicas'" >&2; exit 2;; esac
case $ns in *[!a-z0-9-]*|'') echo "make-certs.sh: '$ns' is not a namespace name" >&2; exit 2;; esac
kvstore=${KVSTORE:-kvstore}
mkdir -p "$dir/ca" "$dir/secret" "$dir/client"
[ -f "$dir/ca/ca.key" ] || "$kvstore" cert create-ca --certs-dir "$dir/ca"
[ -f "$dir/ca/client.root.crt" ] || "$kvstore" cert create-client --certs-dir "$dir/ca" --user root
cp "$dir/ca/ca.crt" "$dir/secret/ca.crt"
cp "$dir/ca/ca.crt" "$dir/client/ca.crt"
for f in client.root.crt client.root.key; do
  cp "$dir/ca/$f" "$dir/secret/$f"
  cp "$dir/ca/$f" "$dir/client/$f"
done
i=0
while [ "$i" -lt "$replicas" ]; do
  pod=kvstore-$i
  if [ ! -f "$dir/nodes/$pod/node.crt" ]; then
    mkdir -p "$dir/nodes/$pod"
    "$kvstore" cert create-node --certs-dir "$dir/nodes/$pod" --ca-key "$dir/ca/ca.key" --node-id $((i + 1)) \
      --host "$pod.kvstore-peer" --host "$pod.kvstore-peer.$ns.svc" --host "$pod.kvstore-peer.$ns.svc.cluster.local" \
      --host kvstore --host "kvstore.$ns.svc" --host "kvstore.$ns.svc.cluster.local" \
      --host localhost --host 127.0.0.1
  fi
  cp "$dir/nodes/$pod/node.crt" "$dir/secret/$pod.node.crt"
  cp "$dir/nodes/$pod/node.key" "$dir/secret/$pod.node.key"
  i=$((i + 1))
done
echo "certificates for $replicas pod(s) of namespace $ns in $dir/secret; next:"
echo "  kubectl -n $ns create secret generic kvstore-tls --from-file=$dir/secret"
