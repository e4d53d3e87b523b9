#!/bin/sh
# PID 1 of the enclave application (started by the Nitro init). The enclave has no network but
# its loopback: bring it up, point the KMS endpoint's name at the loopback forwarder
# (enclave/kmsforward.py carries it over vsock to the parent's blind relay; TLS ends here), then
# become the enclave process so it receives SIGTERM directly.
set -eu
ip link set dev lo up
echo "127.0.0.1 kms.${NCI_REGION}.amazonaws.com" >> /etc/hosts
exec python -m enclave --config /etc/nci/enclave.json
