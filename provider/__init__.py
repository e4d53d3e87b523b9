"""The model provider's tools: seal weights into a bundle, publish it, create the KMS key.

This role is built by a later issue; the package exists so that the import rules hold from day one.
"""

__all__: list[str] = []
