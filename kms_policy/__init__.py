"""KMS key policies: generate from measurements, lint for holes, evaluate requests as KMS does.

This role is built by a later issue; the package exists so that the import rules hold from day one.
"""

__all__: list[str] = []
