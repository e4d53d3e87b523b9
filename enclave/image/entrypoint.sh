#!/bin/sh
# PID 1 of the enclave application (started by the Nitro init). exec: the enclave process receives
# SIGTERM directly. --inside-image: before anything else, Python brings the loopback interface up
# (the enclave has no other network) and resolves the KMS host of the measured configuration's
# kms_endpoint to 127.0.0.1, where enclave/kmsforward.py carries the TLS connection over vsock to
# the parent's blind relay (enclave/netif.py). No region or host name is set here.
set -eu
exec python -m enclave --config /etc/nci/enclave.json --inside-image
