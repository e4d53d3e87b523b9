"""KMS key policies: generate from measurements, lint for holes, evaluate requests as KMS does.

Generate the policy that releases the weights' data key only to the released enclave image, then
audit any policy against the expected measurements::

    from kms_policy import KeyPolicy, check, generate
    policy = generate(measurements={0: pcr0}, role_arn=role, provider_arn=provider,
                      admin_arns=[admin])
    report = check(KeyPolicy.from_json(text), expect=[{0: pcr0}], role_arn=role)
    print(report.summary())

:func:`evaluate` decides one :class:`KmsRequest` as KMS would (explicit deny > allow > implicit
deny); :func:`attestation_context` builds the ``kms:RecipientAttestation:*`` keys of a request
that carries an authenticated attestation document. Errors: :mod:`kms_policy.errors`.
"""

from kms_policy.check import Finding, PolicyReport, check
from kms_policy.evaluate import Decision, KmsRequest, attestation_context, evaluate
from kms_policy.generate import generate
from kms_policy.model import KeyPolicy, Statement

__all__ = [
    "Decision",
    "Finding",
    "KeyPolicy",
    "KmsRequest",
    "PolicyReport",
    "Statement",
    "attestation_context",
    "check",
    "evaluate",
    "generate",
]
