"""Generate the key policy that releases the weights' data key only to the released enclave image.

Sources: AWS KMS Developer Guide, "Key policies in AWS KMS", "Default key policy" (why we leave out
the account-principal statement), "Condition keys for AWS Nitro Enclaves", "kms:EncryptionContext";
IAM User Guide, "Policy evaluation logic", "Condition operators", "AWS global condition context
keys" (``aws:PrincipalArn``: for a role session, the role's ARN).

The statements, and why:

``KeyAdministration``
    The admins get the management actions, listed one by one (no ``kms:Create*``: it covers
    ``kms:CreateGrant``). They keep ``kms:PutKeyPolicy``: a new enclave release changes PCR0, so the
    policy must be updated, and KMS's lockout safety check refuses a policy its creator cannot
    change. Admins are therefore the provider's trust anchor (they could rewrite the policy); they
    never get a data-plane action, and they may not be the parent's role or an account principal.
``ProviderSealsWeights``
    The provider gets ``kms:GenerateDataKey`` (sealing) and ``kms:DescribeKey``, pinned to the
    encryption context when one is given. It needs no attestation: it runs outside any enclave.
``EnclaveDecryptsWithAttestation``
    The parent's role gets ``kms:Decrypt`` only, with ``StringEqualsIgnoreCase`` on ImageSha384 and
    every pinned PCR (never ``…IfExists``), and the encryption-context pins. The enclave and the
    parent share this role, so the attestation conditions are what keeps the parent out. During a
    rollout (several measurement sets), each image gets its own Allow, ``…Attestation2`` and on:
    one condition listing the values of both images would let PCRs of one image pass with PCR8 of
    the other.
``DenyDecryptWithoutAttestation``
    Deny ``kms:Decrypt`` to everyone when ``Null`` says ImageSha384 is absent: no attestation
    document, no data key, whatever else is ever added to this policy or to IAM.
``DenyDecryptOtherImage``, ``DenyDecryptOtherPCR<n>``
    One Deny per pinned key: ``kms:Decrypt`` for another measurement. Keys are AND-ed inside one
    condition, so "any key differs" takes one statement per key. Redundant with the Allow today;
    it keeps a later, looser Allow from releasing the key to another image. With several images
    the Deny lists each image's value (a negated operator is true when the value matches none of
    them): a per-key Deny cannot forbid mixing PCR1 of one image with PCR2 of another, and need
    not, since ImageSha384 (PCR0) measures everything PCR1 and PCR2 do and the Allows pin whole
    sets (IAM User Guide, "Condition operators", multiple values with a negated operator).
``DenyReEncrypt``
    ``kms:ReEncrypt*`` takes no ``Recipient``: ReEncryptFrom would move the data key under a key
    the caller controls, ReEncryptTo would plant a chosen one. Denied to everyone, unconditionally.
``DenyDataKeysExceptProvider``
    The scoping problem: a Deny of ``kms:GenerateDataKey*`` "when unattested" for ``"*"`` would also
    stop the provider, who seals without attestation. So this Deny names who is exempt instead of
    when: ``kms:GenerateDataKey*`` and ``kms:Encrypt`` are denied to every principal whose
    ``aws:PrincipalArn`` is not the provider's (``ArnNotEquals``; a negated operator is true when
    the key is absent, so anonymous callers are denied too). It holds with or without attestation:
    nobody else, an attested enclave included, needs to make data keys, and whoever can make one
    can forge a bundle the enclave would load as the provider's. ``aws:PrincipalArn`` is used, not
    ``NotPrincipal``: AWS advises against NotPrincipal with Deny, and for a role session it would
    have to list the session ARN too.
``DenyGrants``
    A grant carries no attestation condition, so ``kms:CreateGrant`` is denied to everyone.
``DenyEnclaveRoleAllButDecrypt``
    The parent's role may do nothing but ``kms:Decrypt`` (``NotAction``): no PutKeyPolicy, no grant,
    even if an admin list is later widened by mistake.

There is no statement for the account principal (``arn:aws:iam::ACCOUNT:root``): without it, IAM
policies cannot grant anything on this key, which is the point.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from attestation.document import PCR_LENGTH
from kms_policy.errors import ConfigError, PolicyParseError
from kms_policy.evaluate import IMAGE_SHA384, pcr_key
from kms_policy.model import MAX_POLICY_SIZE, WILDCARD, Condition, KeyPolicy, Statement

__all__ = [
    "ADMIN_ACTIONS",
    "ALLOWED_PCRS",
    "DATA_PLANE_ACTIONS",
    "PROVIDER_ACTIONS",
    "generate",
]

# PCR0 image, PCR1 kernel and bootstrap, PCR2 application, PCR3 parent's IAM role, PCR4 parent
# instance id, PCR8 signing certificate (AWS Nitro Enclaves User Guide, "Where to get measurements")
ALLOWED_PCRS = frozenset({0, 1, 2, 3, 4, 8})

ADMIN_ACTIONS = (
    "kms:CancelKeyDeletion",
    "kms:CreateAlias",
    "kms:DeleteAlias",
    "kms:DescribeKey",
    "kms:DisableKey",
    "kms:DisableKeyRotation",
    "kms:EnableKey",
    "kms:EnableKeyRotation",
    "kms:GetKeyPolicy",
    "kms:GetKeyRotationStatus",
    "kms:ListGrants",
    "kms:ListKeyPolicies",
    "kms:ListKeyRotations",
    "kms:ListResourceTags",
    "kms:PutKeyPolicy",
    "kms:RevokeGrant",
    "kms:RotateKeyOnDemand",
    "kms:ScheduleKeyDeletion",
    "kms:TagResource",
    "kms:UntagResource",
    "kms:UpdateAlias",
    "kms:UpdateKeyDescription",
)

PROVIDER_ACTIONS = ("kms:DescribeKey", "kms:GenerateDataKey")

# Actions that yield, move or plant key material (AWS KMS API reference, "cryptographic operations")
DATA_PLANE_ACTIONS = (
    "kms:CreateGrant",
    "kms:Decrypt",
    "kms:Encrypt",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyPair",
    "kms:GenerateDataKeyPairWithoutPlaintext",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
)

_NAME = r"[\w+=,.@-]+"
_IAM_ARN = re.compile(rf"arn:aws(?:-cn|-us-gov)?:iam::\d{{12}}:(role|user)/(?:{_NAME}/)*{_NAME}")


def generate(
    *,
    measurements: Mapping[int, bytes] | Sequence[Mapping[int, bytes]],
    role_arn: str,
    provider_arn: str,
    admin_arns: Sequence[str],
    encryption_context: Mapping[str, str] | None = None,
) -> KeyPolicy:
    """The key policy for the weights' KMS key (see the module docstring for each statement).

    ``measurements`` are the released image's PCRs (PCR0 required; 1, 2, 3, 4, 8 optional), or
    during a rollout a list of such sets, one per image, each pinning the same PCRs;
    ``role_arn`` is the parent instance's role (shared with the enclave); ``provider_arn`` seals;
    ``admin_arns`` manage the key. Raises :class:`ConfigError` on any unfit input.
    """
    # (1) inputs: measurements of production images, distinct IAM principals
    images = _images(measurements)
    role = _iam_arn(role_arn, "role_arn", kinds=("role",))
    provider = _iam_arn(provider_arn, "provider_arn", kinds=("role", "user"))
    if isinstance(admin_arns, str) or not admin_arns:
        raise ConfigError("admin_arns must be a non-empty list of IAM role or user ARNs")
    admins = tuple(_iam_arn(a, "admin_arns", kinds=("role", "user")) for a in admin_arns)
    if len(set(admins)) != len(admins):
        raise ConfigError("admin_arns repeats an ARN")
    if role in admins:
        raise ConfigError("the enclave's role may not administer the key (PutKeyPolicy)")
    if role == provider:
        raise ConfigError("the enclave's role may not be the provider (it could forge bundles)")
    context_pins = _context_pins(encryption_context)

    # (2) statements: allows first (one per image), then the denies that make them the only way in
    provider_condition: dict[str, dict[str, tuple[str, ...]]] = {}
    if context_pins:
        provider_condition["StringEquals"] = context_pins
    statements = [
        _allow("KeyAdministration", admins, ADMIN_ACTIONS),
        _allow("ProviderSealsWeights", (provider,), PROVIDER_ACTIONS, provider_condition),
    ]
    for number, pins in enumerate(images, 1):
        decrypt_condition: dict[str, dict[str, tuple[str, ...]]] = {"StringEqualsIgnoreCase": pins}
        if context_pins:
            decrypt_condition["StringEquals"] = context_pins
        sid = "EnclaveDecryptsWithAttestation" + (str(number) if number > 1 else "")
        statements.append(_allow(sid, (role,), ("kms:Decrypt",), decrypt_condition))
    statements.append(
        _deny(
            "DenyDecryptWithoutAttestation", ("kms:Decrypt",), {"Null": {IMAGE_SHA384: ("true",)}}
        )
    )
    for key in images[0]:
        name = "Image" if key == IMAGE_SHA384 else key.rsplit(":", 1)[1]
        values = tuple(value for pins in images for value in pins[key])
        mismatch = {"StringNotEqualsIgnoreCase": {key: values}}
        statements.append(_deny(f"DenyDecryptOther{name}", ("kms:Decrypt",), mismatch))
    not_provider = {"ArnNotEquals": {"aws:PrincipalArn": (provider,)}}
    statements += [
        _deny("DenyReEncrypt", ("kms:ReEncrypt*",)),
        _deny("DenyDataKeysExceptProvider", ("kms:Encrypt", "kms:GenerateDataKey*"), not_provider),
        _deny("DenyGrants", ("kms:CreateGrant",)),
        Statement(
            sid="DenyEnclaveRoleAllButDecrypt",
            effect="Deny",
            principal={"AWS": (role,)},
            not_action=("kms:Decrypt",),
            resource=(WILDCARD,),
        ),
    ]
    policy = KeyPolicy(version="2012-10-17", statements=tuple(statements))
    # (3) KMS's size limit, and the document must parse back to the same policy
    text = policy.to_json()
    if len(text.encode()) > MAX_POLICY_SIZE:
        raise ConfigError(f"the generated policy exceeds KMS's {MAX_POLICY_SIZE} bytes")
    try:
        if KeyPolicy.from_json(text) != policy:  # pragma: no cover - a bug in this module
            raise ConfigError("the generated policy does not round-trip")
    except PolicyParseError as error:  # pragma: no cover - e.g. a Sid or ARN breaking the grammar
        raise ConfigError(f"the generated policy does not parse: {error}") from None
    return policy


def _allow(
    sid: str, arns: tuple[str, ...], actions: tuple[str, ...], condition: Condition | None = None
) -> Statement:
    return Statement(
        sid=sid,
        effect="Allow",
        principal={"AWS": arns},
        action=actions,
        resource=(WILDCARD,),
        condition=condition or {},
    )


def _deny(sid: str, actions: tuple[str, ...], condition: Condition | None = None) -> Statement:
    return Statement(
        sid=sid,
        effect="Deny",
        principal=WILDCARD,
        action=actions,
        resource=(WILDCARD,),
        condition=condition or {},
    )


def _images(
    measurements: Mapping[int, bytes] | Sequence[Mapping[int, bytes]],
) -> list[dict[str, tuple[str, ...]]]:
    """The pins of each image: one mapping, or a non-empty list of them pinning the same PCRs."""
    if isinstance(measurements, Mapping):
        return [_measurement_pins(measurements, "measurements")]
    if not isinstance(measurements, list | tuple):
        raise ConfigError("measurements must be a mapping of PCR index to value, or a list of them")
    if not measurements:
        raise ConfigError("measurements lists no image")
    images = [_measurement_pins(m, f"measurements[{n}]") for n, m in enumerate(measurements)]
    for number, pins in enumerate(images[1:], 1):
        if set(pins) != set(images[0]):
            raise ConfigError(
                f"measurements[{number}] pins other PCRs than measurements[0]: every image must "
                "pin the same ones (a Deny on a PCR one image leaves free would refuse it)"
            )
        if pins in images[:number]:
            raise ConfigError(f"measurements[{number}] repeats an earlier image")
    return images


def _measurement_pins(measurements: object, where: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(measurements, Mapping) or 0 not in measurements:
        raise ConfigError(f"{where} must include PCR0 (kms:RecipientAttestation:ImageSha384)")
    pins: dict[str, tuple[str, ...]] = {}
    for index in sorted(measurements, key=lambda i: (not isinstance(i, int), str(i))):
        value = measurements[index]
        if isinstance(index, bool) or index not in ALLOWED_PCRS:
            allowed = ", ".join(str(i) for i in sorted(ALLOWED_PCRS))
            raise ConfigError(f"PCR{index} cannot be pinned; KMS policies here take {allowed}")
        if not isinstance(value, bytes) or len(value) != PCR_LENGTH:
            length = len(value) if isinstance(value, bytes) else type(value).__name__
            raise ConfigError(f"{where}[{index}] is {length} bytes; SHA384 PCRs are 48")
        if value == bytes(PCR_LENGTH):
            raise ConfigError(
                f"{where}[{index}] is all zero: a debug-mode enclave, whose memory the "
                "parent can read, must never receive the data key"
            )
        if index == 0:
            pins[IMAGE_SHA384] = (value.hex(),)
        pins[pcr_key(index)] = (value.hex(),)
    return pins


def _iam_arn(value: object, name: str, *, kinds: tuple[str, ...]) -> str:
    match = _IAM_ARN.fullmatch(value) if isinstance(value, str) else None
    if match is None or match.group(1) not in kinds:
        what = " or ".join(kinds)
        raise ConfigError(
            f"{name}: {value!r} is not an IAM {what} ARN (account principals, wildcards and "
            "sessions are refused: they would cover more than one principal)"
        )
    return str(value)


def _context_pins(context: Mapping[str, Any] | None) -> dict[str, tuple[str, ...]]:
    if context is None:
        return {}
    if not isinstance(context, Mapping):
        raise ConfigError("encryption_context must be a mapping of strings to strings")
    pins: dict[str, tuple[str, ...]] = {}
    for key, value in sorted(context.items()):
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise ConfigError(
                f"encryption_context[{key!r}] must map a non-empty string to a string"
            )
        pins[f"kms:EncryptionContext:{key}"] = (value,)
    return pins
