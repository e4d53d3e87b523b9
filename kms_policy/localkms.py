"""The local attestation-aware KMS: moto's KMS in server mode, plus what moto lacks.

moto keeps the keys, ciphertext blobs, aliases and encryption-context handling. A WSGI gateway in
front of it adds, for every KMS call (``X-Amz-Target: TrentService.<Action>``):

1. the caller: the access key id of the SigV4 ``Authorization`` header, mapped to a principal ARN
   by the configuration (an unknown key is refused as KMS refuses it:
   ``UnrecognizedClientException``);
2. ``Recipient`` on ``Decrypt``, ``GenerateDataKey`` and ``GenerateRandom``: the attestation
   document is authenticated (chain to a configured root, signature, at most 5 minutes old), its
   ``public_key`` must be an RSA key of 2048 to 4096 bits, and its PCRs become the
   ``kms:RecipientAttestation:ImageSha384`` / ``PCR<n>`` condition keys; an invalid document is a
   ``ValidationException``;
3. key-policy enforcement through :func:`kms_policy.evaluate` on every call that names a key, with
   KMS's ``AccessDeniedException`` on denial;
4. with a ``Recipient``, the response carries ``CiphertextForRecipient`` (CMS EnvelopedData to the
   attested key) and no ``Plaintext``, as AWS KMS answers.

Other services (S3 for sealed bundles) pass through to moto unchanged. It listens on loopback only.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import struct
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from moto.core.exceptions import JsonRESTError

from attestation.errors import AttestationError
from attestation.roots import TrustRoot
from attestation.verify import authenticate
from kms_policy.errors import ConfigError, KmsPolicyError
from kms_policy.evaluate import KmsRequest, evaluate, request_context
from kms_policy.model import KeyPolicy
from kms_policy.recipient import RecipientError, envelope_for_recipient, recipient_public_key

__all__ = ["LocalKms", "LocalKmsConfig"]

log = logging.getLogger(__name__)

MAX_REQUEST_BODY = 1024 * 1024
ATTESTATION_MAX_AGE = timedelta(minutes=5)
_SCOPE = re.compile(
    r"(?P<akid>[A-Z0-9]{4,128})/(?P<date>\d{8})/(?P<region>[a-z]{2}(?:-[a-z]+)+-\d{1,2})"
    r"/(?P<service>[a-z0-9-]{1,32})/aws4_request"
)
_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=" + _SCOPE.pattern + r", ?SignedHeaders=[a-z0-9;-]{1,1024}"
    r", ?Signature=[0-9a-f]{64}"
)
_TARGET = re.compile(r"TrentService\.([A-Za-z]{1,64})")
_KEY_FIELDS = ("KeyId", "TargetKeyId", "DestinationKeyId", "SourceKeyId", "AliasName")
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
_RECIPIENT_ACTIONS = {"Decrypt", "GenerateDataKey", "GenerateRandom"}
# Calls without a key: governed by IAM policies only, which this local KMS does not model. Every
# other operation must name a key whose policy is checked, or it is refused.
_KEYLESS_ACTIONS = {"CreateKey", "ListKeys", "ListAliases", "GenerateRandom", "ListRetirableGrants"}


@dataclass(frozen=True)
class LocalKmsConfig:
    """Who is who, and which attestation roots the local KMS trusts.

    ``principals`` maps access key ids to principal ARNs (e.g. the provider's role and the parent
    instance's role). ``trusted_roots`` is the AWS Nitro root plus, for local mode, the emulator's.
    """

    principals: Mapping[str, str]
    trusted_roots: tuple[TrustRoot, ...]
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        if not self.principals:
            raise ConfigError("the local KMS needs at least one access key → principal mapping")
        for key, arn in self.principals.items():
            if not re.fullmatch(r"[A-Za-z0-9]{1,128}", key) or not arn.startswith("arn:aws:"):
                raise ConfigError(f"principal mapping {key!r} → {arn!r}: expected AKID → arn:aws:…")
        if not self.trusted_roots:
            raise ConfigError("the local KMS needs at least one trusted attestation root")

    @classmethod
    def from_yaml(cls, path: Path) -> LocalKmsConfig:
        """Read ``principals: {AKID: ARN}`` and ``trusted_roots: [aws | PEM path, …]``."""
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read local KMS configuration {path}: {exc}") from None
        if not isinstance(doc, dict) or set(doc) - {"principals", "trusted_roots"}:
            raise ConfigError(f"{path}: expected keys 'principals' and 'trusted_roots'")
        principals = doc.get("principals")
        roots_spec = doc.get("trusted_roots", ["aws"])
        if not isinstance(principals, dict) or not isinstance(roots_spec, list):
            raise ConfigError(f"{path}: 'principals' is a mapping, 'trusted_roots' a list")
        roots: list[TrustRoot] = []
        for item in roots_spec:
            if item == "aws":
                roots.append(TrustRoot.aws_nitro_g1())
                continue
            root_path = (path.parent / str(item)).resolve()
            try:
                roots.append(TrustRoot.local(root_path.read_bytes()))
            except (OSError, AttestationError) as exc:
                raise ConfigError(f"{path}: trusted root {item}: {exc}") from None
        return cls(
            principals={str(k): str(v) for k, v in principals.items()},
            trusted_roots=tuple(roots),
        )


class KmsError(Exception):
    """A KMS error answer: HTTP 400 with ``{"__type": code, "message": …}``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Call:
    action: str
    body: dict[str, Any]
    principal: str
    access_key: str
    account: str
    region: str


class KmsGateway:
    """WSGI application in front of moto's KMS and S3 backends (see the module docstring).

    Routing is an allow-list: a request reaches moto only as a well-formed KMS call that passed the
    checks below, or as a signed S3 request. Everything else (moto's ``/moto-api`` admin routes,
    unsigned requests, other services, malformed targets) is refused, so that no header trick can
    make moto act on another account, region or key than the one the policy was evaluated for.
    """

    def __init__(
        self,
        kms_app: Callable[..., Iterable[bytes]],
        s3_app: Callable[..., Iterable[bytes]],
        config: LocalKmsConfig,
    ) -> None:
        self._kms_app = kms_app
        self._s3_app = s3_app
        self._config = config

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        for name in [k for k in environ if k.startswith("HTTP_X_MOTO_")]:
            del environ[name]  # moto's own account/region overrides are not for callers
        scope = _credential(environ)
        target = environ.get("HTTP_X_AMZ_TARGET")
        if environ.get("PATH_INFO", "").startswith("/moto-api"):
            return _error(start_response, KmsError("AccessDeniedException", "not available"), 403)
        if target is not None or (scope is not None and scope.service == "kms"):
            return self._kms(environ, start_response)
        if scope is not None and scope.service == "s3":
            return self._s3_app(environ, start_response)
        return _error(
            start_response,
            KmsError("AccessDeniedException", "only signed KMS and S3 requests are served"),
            403,
        )

    def _kms(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        try:
            call = self._read_call(environ)
            recipient = self._authorize(call)
        except KmsError as exc:
            return _error(start_response, exc)
        except (KmsPolicyError, RecursionError, ValueError, TypeError) as exc:
            return _error(start_response, KmsError("ValidationException", _short(exc)))
        forwarded = dict(call.body)
        forwarded.pop("Recipient", None)
        _canonical_headers(environ, call, forwarded)
        if recipient is None:
            return self._kms_app(environ, start_response)
        status, headers, payload = self._call_moto(environ)
        if not status.startswith("200"):
            start_response(status, headers)
            return [payload]
        try:
            answer = self._for_recipient(json.loads(payload), recipient)
        except (ValueError, KeyError, RecipientError) as exc:
            return _error(start_response, KmsError("KMSInternalException", _short(exc)))
        return _json(start_response, "200 OK", answer)

    # (1) the caller and the request ------------------------------------------------------------

    def _read_call(self, environ: dict[str, Any]) -> _Call:
        if environ.get("REQUEST_METHOD") != "POST" or environ.get("PATH_INFO", "/") != "/":
            raise KmsError("UnknownOperationException", "KMS calls are POST /")
        match = _TARGET.fullmatch(environ.get("HTTP_X_AMZ_TARGET", ""))
        if match is None or match.group(1) not in _kms_operations():
            raise KmsError("UnknownOperationException", "X-Amz-Target is not a KMS operation")
        scope = _credential(environ)
        if scope is None or scope.service != "kms":
            raise KmsError(
                "MissingAuthenticationTokenException", "request is not signed (SigV4) for kms"
            )
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise KmsError("ValidationException", "bad Content-Length") from None
        if not 0 <= length <= MAX_REQUEST_BODY:
            raise KmsError("ValidationException", f"request body exceeds {MAX_REQUEST_BODY} bytes")
        raw = environ["wsgi.input"].read(length)
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, RecursionError):
            raise KmsError("SerializationException", "request body is not JSON") from None
        if not isinstance(body, dict):
            raise KmsError("SerializationException", "request body is not a JSON object")
        principal = self._config.principals.get(scope.access_key)
        if principal is None:
            raise KmsError(
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        account = _moto_account(scope.access_key)
        return _Call(match.group(1), body, principal, scope.access_key, account, scope.region)

    # (2) attestation and (3) the key policy ----------------------------------------------------

    def _authorize(self, call: _Call) -> bytes | None:
        """Evaluate the key policy; return the attested RSA key (DER SPKI) if a Recipient is set."""
        attested_pcrs, spki = self._recipient(call)
        if call.action in {"CreateKey", "PutKeyPolicy"} and "Policy" in call.body:
            _check_policy_document(call.body["Policy"])
        targets = self._targets(call)
        if not targets and call.action not in _KEYLESS_ACTIONS:
            raise KmsError(
                "ValidationException", f"{call.action} names no key this local KMS can check"
            )
        context = request_context(
            call.principal,
            encryption_context=_encryption_context(call.body),
            attestation_pcrs=attested_pcrs,
        )
        for key_arn, action in targets:
            decision = evaluate(
                _key_policy(key_arn),
                KmsRequest(
                    principal=call.principal, action=action, resource=key_arn, context=context
                ),
            )
            log.info("%s by %s on %s: %s", action, call.principal, key_arn, decision.reason)
            if not decision.allowed:
                raise KmsError(
                    "AccessDeniedException",
                    f"User: {call.principal} is not authorized to perform: {action} "
                    f"on resource: {key_arn} because {decision.reason}",
                )
        return spki

    def _recipient(self, call: _Call) -> tuple[Mapping[int, bytes] | None, bytes | None]:
        recipient = call.body.get("Recipient")
        if recipient is None:
            return None, None
        if call.action not in _RECIPIENT_ACTIONS:
            raise KmsError("ValidationException", f"Recipient is not supported by {call.action}")
        if not isinstance(recipient, dict) or set(recipient) - {
            "KeyEncryptionAlgorithm",
            "AttestationDocument",
        }:
            raise KmsError("ValidationException", "Recipient has unknown members")
        if recipient.get("KeyEncryptionAlgorithm") != "RSAES_OAEP_SHA_256":
            raise KmsError(
                "ValidationException", "KeyEncryptionAlgorithm must be RSAES_OAEP_SHA_256"
            )
        try:
            document = base64.b64decode(recipient.get("AttestationDocument", ""), validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise KmsError("ValidationException", "AttestationDocument is not base64") from None
        try:
            authentic = authenticate(
                document,
                roots=self._config.trusted_roots,
                now=self._config.clock(),
                max_age=ATTESTATION_MAX_AGE,
            )
        except AttestationError as exc:
            raise KmsError(
                "ValidationException", f"invalid attestation document: {type(exc).__name__}: {exc}"
            ) from None
        spki = authentic.document.public_key
        if spki is None:
            raise KmsError("ValidationException", "the attestation document has no public_key")
        try:
            recipient_public_key(spki)
        except RecipientError as exc:
            raise KmsError("ValidationException", f"attestation public_key: {exc}") from None
        return authentic.document.pcrs, spki

    def _targets(self, call: _Call) -> list[tuple[str, str]]:
        """Every (key ARN, IAM action) pair the call touches; KMS checks each one."""
        body, backend = call.body, _backend(call.account, call.region)
        for name in _KEY_FIELDS:
            if name in body and (
                not isinstance(body[name], str) or not 0 < len(body[name]) <= 2048
            ):
                raise KmsError("ValidationException", f"{name} must be a non-empty string")
        action = f"kms:{call.action}"
        targets: list[tuple[str, str]] = []
        if call.action in {"Decrypt", "ReEncrypt"}:
            # the key inside the blob, always, whatever KeyId / SourceKeyId also say
            source = "kms:ReEncryptFrom" if call.action == "ReEncrypt" else action
            blob_key = _key_id_from_blob(body.get("CiphertextBlob"))
            targets.append((_resolve(backend, blob_key), source))
            for name in ("KeyId", "SourceKeyId"):
                if name in body:
                    targets.append((_resolve(backend, body[name]), source))
            if call.action == "ReEncrypt":
                if "DestinationKeyId" not in body:
                    raise KmsError("ValidationException", "DestinationKeyId is required")
                targets.append((_resolve(backend, body["DestinationKeyId"]), "kms:ReEncryptTo"))
            return targets
        if call.action in {"CreateAlias", "UpdateAlias", "DeleteAlias"}:
            alias = body.get("AliasName")
            if isinstance(alias, str) and backend.alias_exists(alias):
                targets.append((_resolve(backend, alias), action))  # the alias's current key
        for name in ("KeyId", "TargetKeyId", "DestinationKeyId"):
            if name in body:
                targets.append((_resolve(backend, body[name]), action))
        return targets

    # (4) the answer for a Recipient ------------------------------------------------------------

    @staticmethod
    def _for_recipient(answer: dict[str, Any], spki: bytes) -> dict[str, Any]:
        plaintext = base64.b64decode(answer.pop("Plaintext"))
        envelope = envelope_for_recipient(plaintext, spki)
        answer["CiphertextForRecipient"] = base64.b64encode(envelope).decode("ascii")
        return answer

    def _call_moto(self, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        payload = b"".join(self._kms_app(environ, capture))
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(payload))))
        return captured["status"], headers, payload


class LocalKms:
    """Run the local KMS (moto server + gateway) on loopback in a background thread.

    ``with LocalKms(config) as kms: boto3.client("kms", endpoint_url=kms.endpoint_url, …)``.
    """

    def __init__(self, config: LocalKmsConfig, *, host: str = "127.0.0.1", port: int = 0) -> None:
        if host not in _LOOPBACK:
            raise ConfigError(f"the local KMS listens on loopback only, not {host!r}")
        self._config = config
        self._host = host
        self._port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> LocalKms:
        from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        class QuietHandler(MotoRequestHandler):
            """Access lines go to our logger at DEBUG, not to stderr at INFO."""

            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                log.debug("%s %s", self.requestline, code)

        app = KmsGateway(create_backend_app("kms"), create_backend_app("s3"), self._config)
        self._server = make_server(
            self._host, self._port, app, threaded=True, request_handler=QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="nci-local-kms", daemon=True
        )
        self._thread.start()
        return self

    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise ConfigError("the local KMS is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def serve_forever(self) -> None:
        """Block until interrupted (``nci kms serve``)."""
        self.start()
        assert self._thread is not None
        try:
            while self._thread.is_alive():
                self._thread.join(timeout=0.5)
        finally:
            self.stop()

    def __enter__(self) -> LocalKms:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- helpers -----------------------------------------------------------------------------------


def _moto_account(access_key: str) -> str:
    """The account moto files this caller's keys under (moto's own rule, so both sides agree)."""
    from moto.iam.models import get_account_id_from

    return str(get_account_id_from(access_key))


def _backend(account: str, region: str) -> Any:
    from moto.kms.models import kms_backends

    return kms_backends[account][region]


def _key_policy(key_arn: str) -> KeyPolicy:
    parts = key_arn.split(":")
    backend = _backend(parts[4], parts[3])
    text = backend.get_key_policy(key_arn.split("/")[-1])
    try:
        return KeyPolicy.from_json(text)
    except KmsPolicyError:  # fail closed: a key whose policy we cannot read serves no one
        raise KmsError(
            "AccessDeniedException", f"the key policy of {key_arn} is unreadable"
        ) from None


def _key_id_from_blob(blob: object) -> str:
    from moto.kms.utils import _deserialize_ciphertext_blob

    try:
        raw = base64.b64decode(str(blob), validate=True)
        return str(_deserialize_ciphertext_blob(raw).key_id)
    except (binascii.Error, ValueError, struct.error, UnicodeDecodeError):
        raise KmsError("InvalidCiphertextException", "the ciphertext is invalid") from None


def _encryption_context(body: Mapping[str, Any]) -> dict[str, str] | None:
    context = body.get("EncryptionContext")
    if context is None:
        return None
    if not isinstance(context, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in context.items()
    ):
        raise KmsError("ValidationException", "EncryptionContext must map strings to strings")
    return dict(context)


@dataclass(frozen=True)
class _Scope:
    access_key: str
    date: str
    region: str
    service: str


def _credential(environ: Mapping[str, Any]) -> _Scope | None:
    """The SigV4 credential scope of the Authorization header, or of a presigned URL's query."""
    match = _AUTHORIZATION.fullmatch(environ.get("HTTP_AUTHORIZATION", ""))
    if match is None:
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        values = query.get("X-Amz-Credential", [])
        match = _SCOPE.fullmatch(values[0]) if len(values) == 1 else None
    if match is None:
        return None
    return _Scope(*match.group("akid", "date", "region", "service"))


def _canonical_headers(environ: dict[str, Any], call: _Call, body: dict[str, Any]) -> None:
    """Rewrite what moto reads (body, Authorization, User-Agent, Host) from the checked values.

    moto takes the region from the Host, then the User-Agent, then the first Authorization field,
    and the account from the access key: after this, it can only act where the policy was checked.
    """
    data = json.dumps(body).encode()
    environ["wsgi.input"] = io.BytesIO(data)
    environ["CONTENT_LENGTH"] = str(len(data))
    environ["HTTP_AUTHORIZATION"] = (
        f"AWS4-HMAC-SHA256 Credential={call.access_key}/20200101/{call.region}/kms/aws4_request, "
        "SignedHeaders=host, Signature=" + "0" * 64
    )
    environ["HTTP_USER_AGENT"] = "nci-local-kms"
    environ["HTTP_HOST"] = "127.0.0.1"


def _check_policy_document(policy: object) -> None:
    if not isinstance(policy, str):
        raise KmsError("MalformedPolicyDocumentException", "Policy must be a JSON string")
    try:
        KeyPolicy.from_json(policy)
    except KmsPolicyError as exc:
        raise KmsError("MalformedPolicyDocumentException", _short(exc)) from None


def _resolve(backend: Any, key_id: str) -> str:
    try:
        return str(backend.describe_key(backend.any_id_to_key_id(key_id)).arn)
    except (KeyError, AttributeError, TypeError, ValueError, JsonRESTError):
        raise KmsError("NotFoundException", f"Key '{key_id}' does not exist") from None


@cache
def _kms_operations() -> frozenset[str]:
    import botocore.session

    return frozenset(botocore.session.get_session().get_service_model("kms").operation_names)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _json(start_response: Callable[..., Any], status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status,
        [("Content-Type", "application/x-amz-json-1.1"), ("Content-Length", str(len(data)))],
    )
    return [data]


def _error(start_response: Callable[..., Any], error: KmsError, status: int = 400) -> list[bytes]:
    reason = "400 Bad Request" if status == 400 else "403 Forbidden"
    return _json(start_response, reason, {"__type": error.code, "message": str(error)})


def principals_from(pairs: Sequence[str]) -> dict[str, str]:
    """Parse ``AKID=ARN`` pairs (``nci kms serve --principal``)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, arn = pair.partition("=")
        if not sep:
            raise ConfigError(f"--principal {pair!r}: expected ACCESS_KEY_ID=ARN")
        out[key.strip()] = arn.strip()
    return out
