"""Contracts every party shares: transport addresses, vsock frames, Oblivious HTTP, sealed bundles.

This role is built by a later issue; the package exists so that the import rules hold from day one.
"""

__all__: list[str] = []
