"""The generated key policy, evaluated: only the attested, released image gets the data key."""

from __future__ import annotations

from typing import Any

import pytest

from kms_policy.errors import ConfigError
from kms_policy.evaluate import KmsRequest, evaluate, request_context
from kms_policy.generate import generate
from kms_policy.model import KeyPolicy

ROLE = "arn:aws:iam::111122223333:role/nci/enclave-parent"
SESSION = "arn:aws:sts::111122223333:assumed-role/enclave-parent/i-0abc"
PROVIDER = "arn:aws:iam::444455556666:role/model-provider"
PROVIDER_SESSION = "arn:aws:sts::444455556666:assumed-role/model-provider/ci"
ADMIN = "arn:aws:iam::444455556666:user/key-admin"
OPERATOR = "arn:aws:sts::111122223333:assumed-role/operator/mallory"
MEASUREMENTS = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48, 8: b"\x18" * 48}
CONTEXT = {"model": "llava-7b", "bundle": "b-001"}


def _policy(**overrides: Any) -> KeyPolicy:
    arguments: dict[str, Any] = {
        "measurements": MEASUREMENTS,
        "role_arn": ROLE,
        "provider_arn": PROVIDER,
        "admin_arns": [ADMIN],
        "encryption_context": CONTEXT,
    }
    arguments.update(overrides)
    return generate(**arguments)


POLICY = _policy()


def _ask(
    principal: str,
    action: str,
    *,
    pcrs: dict[int, bytes] | None = None,
    context: dict[str, str] | None = CONTEXT,
    principal_arn: str | None = None,
    policy: KeyPolicy = POLICY,
) -> bool:
    request_ctx = request_context(
        principal, encryption_context=context, attestation_pcrs=pcrs, principal_arn=principal_arn
    )
    return evaluate(policy, KmsRequest(principal, action, "*", request_ctx)).allowed


def _attested(**changes: bytes) -> dict[int, bytes]:
    pcrs = {**MEASUREMENTS, 3: b"\x13" * 48, 4: b"\x14" * 48}
    pcrs.update({int(k.removeprefix("pcr")): v for k, v in changes.items()})
    return pcrs


def test_role_with_matching_attestation_gets_decrypt() -> None:
    assert _ask(SESSION, "kms:Decrypt", pcrs=_attested(), principal_arn=ROLE)


def test_rejects_decrypt_by_role_without_attestation() -> None:
    assert not _ask(SESSION, "kms:Decrypt", principal_arn=ROLE)


def test_rejects_decrypt_by_role_with_wrong_pcr0() -> None:
    assert not _ask(SESSION, "kms:Decrypt", pcrs=_attested(pcr0=b"\x66" * 48))


def test_rejects_decrypt_by_role_with_wrong_pinned_pcr8() -> None:
    assert not _ask(SESSION, "kms:Decrypt", pcrs=_attested(pcr8=b"\x66" * 48))


def test_rejects_decrypt_by_debug_mode_enclave() -> None:
    debug = _attested(pcr0=bytes(48), pcr1=bytes(48), pcr2=bytes(48), pcr8=bytes(48))
    assert not _ask(SESSION, "kms:Decrypt", pcrs=debug)


def test_rejects_decrypt_with_wrong_encryption_context() -> None:
    assert not _ask(SESSION, "kms:Decrypt", pcrs=_attested(), context={"model": "other"})
    assert not _ask(SESSION, "kms:Decrypt", pcrs=_attested(), context=None)


def test_rejects_decrypt_by_other_principal_of_the_account_even_attested() -> None:
    assert not _ask(OPERATOR, "kms:Decrypt", pcrs=_attested())


def test_provider_can_generate_data_key_without_attestation() -> None:
    assert _ask(PROVIDER_SESSION, "kms:GenerateDataKey", principal_arn=PROVIDER)
    assert _ask(PROVIDER_SESSION, "kms:DescribeKey", principal_arn=PROVIDER)


def test_provider_generate_data_key_is_pinned_to_the_encryption_context() -> None:
    assert not _ask(PROVIDER_SESSION, "kms:GenerateDataKey", context={"model": "x"})


def test_rejects_decrypt_by_provider() -> None:
    assert not _ask(PROVIDER_SESSION, "kms:Decrypt")
    assert not _ask(PROVIDER_SESSION, "kms:Decrypt", pcrs=_attested())


@pytest.mark.parametrize(
    "action",
    ["kms:GenerateDataKey", "kms:GenerateDataKeyWithoutPlaintext", "kms:Encrypt",
     "kms:CreateGrant", "kms:PutKeyPolicy", "kms:ReEncryptFrom", "kms:ReEncryptTo"],
)  # fmt: skip
def test_rejects_forging_and_grants_by_the_role(action: str) -> None:
    assert not _ask(SESSION, action, principal_arn=ROLE)
    assert not _ask(SESSION, action, pcrs=_attested(), principal_arn=ROLE)


@pytest.mark.parametrize("action", ["kms:Decrypt", "kms:GenerateDataKey", "kms:CreateGrant"])
def test_admins_stay_off_the_data_plane(action: str) -> None:
    assert not _ask(ADMIN, action)
    assert not _ask(ADMIN, action, pcrs=_attested())


def test_admins_can_manage_the_key() -> None:
    for action in ("kms:PutKeyPolicy", "kms:DescribeKey", "kms:ScheduleKeyDeletion"):
        assert _ask(ADMIN, action), action


def test_an_admin_who_is_also_provider_keeps_both_roles() -> None:
    policy = _policy(admin_arns=[PROVIDER])
    assert _ask(PROVIDER_SESSION, "kms:PutKeyPolicy", policy=policy)
    assert _ask(PROVIDER_SESSION, "kms:GenerateDataKey", principal_arn=PROVIDER, policy=policy)
    assert not _ask(PROVIDER_SESSION, "kms:Decrypt", policy=policy)


def test_without_encryption_context_pins_any_context_works() -> None:
    policy = _policy(encryption_context=None)
    assert _ask(SESSION, "kms:Decrypt", pcrs=_attested(), context=None, policy=policy)


def test_policy_pins_every_measurement_with_string_equals_ignore_case() -> None:
    statement = next(s for s in POLICY.statements if s.sid == "EnclaveDecryptsWithAttestation")
    pins = statement.condition["StringEqualsIgnoreCase"]
    assert pins["kms:RecipientAttestation:ImageSha384"] == (MEASUREMENTS[0].hex(),)
    assert set(pins) >= {f"kms:RecipientAttestation:PCR{i}" for i in MEASUREMENTS}
    assert not any(op.endswith("IfExists") for s in POLICY.statements for op in s.condition)


def test_policy_round_trips_and_prints_stably() -> None:
    text = POLICY.to_json()
    assert KeyPolicy.from_json(text) == POLICY
    assert _policy().to_json() == text


# -- a rollout: two images at once, one Allow each -----------------------------------------------

NEXT = {0: b"\x20" * 48, 1: b"\x11" * 48, 2: b"\x22" * 48, 8: b"\x28" * 48}  # same PCR1
ROLLOUT = _policy(measurements=[MEASUREMENTS, NEXT])


def test_rollout_policy_releases_the_key_to_either_image() -> None:
    for image in (MEASUREMENTS, NEXT):
        assert _ask(SESSION, "kms:Decrypt", pcrs={**image, 3: b"\x13" * 48}, policy=ROLLOUT)
    assert not _ask(SESSION, "kms:Decrypt", pcrs=_attested(pcr0=b"\x30" * 48), policy=ROLLOUT)
    assert not _ask(SESSION, "kms:Decrypt", policy=ROLLOUT)


@pytest.mark.parametrize(
    "mixed",
    [
        {**MEASUREMENTS, 8: NEXT[8]},  # the old image signed with the new signing certificate
        {**NEXT, 2: MEASUREMENTS[2]},
        {**MEASUREMENTS, 0: NEXT[0]},
    ],
)
def test_rollout_policy_refuses_pcrs_mixed_from_the_two_images(mixed: dict[int, bytes]) -> None:
    assert not _ask(SESSION, "kms:Decrypt", pcrs=mixed, policy=ROLLOUT)


def test_rollout_policy_has_one_allow_per_image_and_denies_listing_both() -> None:
    by_sid = {s.sid: s for s in ROLLOUT.statements}
    for sid, image in (
        ("EnclaveDecryptsWithAttestation", MEASUREMENTS),
        ("EnclaveDecryptsWithAttestation2", NEXT),
    ):
        pins = by_sid[sid].condition["StringEqualsIgnoreCase"]
        assert pins["kms:RecipientAttestation:PCR8"] == (image[8].hex(),)
    deny = by_sid["DenyDecryptOtherPCR2"].condition["StringNotEqualsIgnoreCase"]
    assert deny == {"kms:RecipientAttestation:PCR2": (MEASUREMENTS[2].hex(), NEXT[2].hex())}
    assert KeyPolicy.from_json(ROLLOUT.to_json()) == ROLLOUT
    single = _policy(measurements=[MEASUREMENTS])
    assert single == POLICY  # a list of one image is the one-image policy


BAD_INPUTS: dict[str, tuple[dict[str, Any], str]] = {
    "no_image": ({"measurements": []}, "no image"),
    "images_pin_different_pcrs": (
        {"measurements": [MEASUREMENTS, {0: b"\x20" * 48}]},
        r"measurements\[1\] pins other PCRs",
    ),
    "image_repeated": ({"measurements": [MEASUREMENTS, dict(MEASUREMENTS)]}, "repeats"),
    "second_image_debug_mode": (
        {"measurements": [MEASUREMENTS, {**NEXT, 2: bytes(48)}]},
        r"measurements\[1\]\[2\] is all zero",
    ),
    "measurements_a_string": ({"measurements": "10" * 48}, "mapping of PCR index"),
    "missing_pcr0": ({"measurements": {1: b"\x11" * 48}}, "PCR0"),
    "zero_pcr_debug_mode": ({"measurements": {0: bytes(48)}}, "all zero"),
    "zero_pcr8": ({"measurements": {0: b"\x10" * 48, 8: bytes(48)}}, "all zero"),
    "pcr5_not_pinnable": ({"measurements": {0: b"\x10" * 48, 5: b"\x15" * 48}}, "PCR5"),
    "short_pcr": ({"measurements": {0: b"\x10" * 32}}, "32 bytes"),
    "hex_string_pcr": ({"measurements": {0: "10" * 48}}, "SHA384"),
    "role_is_account_root": ({"role_arn": "arn:aws:iam::111122223333:root"}, "role_arn"),
    "role_is_a_session": ({"role_arn": SESSION}, "role_arn"),
    "provider_wildcard": ({"provider_arn": "*"}, "provider_arn"),
    "no_admins": ({"admin_arns": []}, "admin_arns"),
    "admin_string_not_list": ({"admin_arns": ADMIN}, "admin_arns"),
    "admin_is_account_root": ({"admin_arns": ["arn:aws:iam::444455556666:root"]}, "admin_arns"),
    "role_is_admin": ({"admin_arns": [ADMIN, ROLE]}, "administer"),
    "role_is_provider": ({"provider_arn": ROLE}, "provider"),
    "context_value_not_string": ({"encryption_context": {"model": 1}}, "encryption_context"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_rejects_unfit_generator_input(name: str) -> None:
    overrides, rule = BAD_INPUTS[name]
    with pytest.raises(ConfigError, match=rule):
        _policy(**overrides)
