"""The consumer's side: attest the enclave, encrypt prompts to it, decrypt completions.

::

    from consumer import Client
    with Client(url, expect="expected-pcrs.yaml") as client:
        print(client.generate("What shape is this?", images=["shape.png"]).text)

:class:`Client` (blocking) and :class:`AsyncClient` verify the enclave's attestation document
(AWS chain, expected PCRs, freshness, the binding of its Oblivious HTTP key) before sending
anything, and refuse any answer that does not authenticate under their own request's key.
``consumer.proxy`` serves the same to unmodified OpenAI clients on loopback. Errors are in
:mod:`consumer.errors`.
"""

from consumer.attest import Attestation
from consumer.client import AsyncClient, AsyncStream, Client, Completion, Stream

__all__ = ["AsyncClient", "AsyncStream", "Attestation", "Client", "Completion", "Stream"]
