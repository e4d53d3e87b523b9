"""The consumer's SDK and CLI: attest the enclave, encrypt prompts, decrypt completions.

This role is built by a later issue; the package exists so that the import rules hold from day one.
"""

__all__: list[str] = []
