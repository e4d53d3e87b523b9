"""Runs inside the enclave: boot, KMS Recipient unwrap, streaming weight decryption, model, server.

This role is built by a later issue; the package exists so that the import rules hold from day one.
"""

__all__: list[str] = []
