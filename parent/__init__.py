"""Runs on the untrusted parent: HTTP bridge, KMS relay, bundle streamer. Moves ciphertext only.

This role is built by a later issue; the package exists so that the import rules hold from day one.
"""

__all__: list[str] = []
