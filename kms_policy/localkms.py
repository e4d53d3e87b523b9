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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from attestation.errors import AttestationError
from attestation.roots import TrustRoot
from attestation.verify import authenticate
from kms_policy.errors import ConfigError
from kms_policy.evaluate import KmsRequest, evaluate, request_context
from kms_policy.model import KeyPolicy
from kms_policy.recipient import RecipientError, envelope_for_recipient, recipient_public_key

__all__ = ["LocalKms", "LocalKmsConfig"]

log = logging.getLogger(__name__)

MAX_REQUEST_BODY = 1024 * 1024
ATTESTATION_MAX_AGE = timedelta(minutes=5)
_CREDENTIAL = re.compile(
    r"Credential=([A-Za-z0-9]{1,128})/\d{8}/([a-z0-9-]{1,32})/kms/aws4_request"
)
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
_RECIPIENT_ACTIONS = {"Decrypt", "GenerateDataKey", "GenerateRandom"}
# Calls without a key: governed by IAM policies only, which this local KMS does not model.
_KEYLESS_ACTIONS = {
    "CreateKey",
    "ListKeys",
    "ListAliases",
    "GenerateRandom",
    "ConnectCustomKeyStore",
}


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
    account: str
    region: str


class KmsGateway:
    """WSGI middleware in front of moto's server application (see the module docstring)."""

    def __init__(self, app: Callable[..., Iterable[bytes]], config: LocalKmsConfig) -> None:
        self._app = app
        self._config = config

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if not target.startswith("TrentService."):
            return self._app(environ, start_response)
        try:
            call = self._read_call(environ, target)
            recipient = self._authorize(call)
        except KmsError as exc:
            return _error(start_response, exc)
        forwarded = dict(call.body)
        forwarded.pop("Recipient", None)
        if recipient is None:
            return self._forward(environ, start_response, forwarded)
        status, headers, payload = self._call_moto(environ, forwarded)
        if not status.startswith("200"):
            start_response(status, headers)
            return [payload]
        try:
            answer = self._for_recipient(json.loads(payload), recipient)
        except (ValueError, RecipientError) as exc:
            return _error(start_response, KmsError("KMSInternalException", str(exc)))
        return _json(start_response, "200 OK", answer)

    # (1) the caller and the request ------------------------------------------------------------

    def _read_call(self, environ: dict[str, Any], target: str) -> _Call:
        action = target.split(".", 1)[1]
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise KmsError("ValidationException", "bad Content-Length") from None
        if not 0 <= length <= MAX_REQUEST_BODY:
            raise KmsError("ValidationException", f"request body exceeds {MAX_REQUEST_BODY} bytes")
        raw = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = io.BytesIO(raw)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise KmsError("SerializationException", "request body is not JSON") from None
        if not isinstance(body, dict):
            raise KmsError("SerializationException", "request body is not a JSON object")
        match = _CREDENTIAL.search(environ.get("HTTP_AUTHORIZATION", ""))
        if match is None:
            raise KmsError("MissingAuthenticationTokenException", "request is not signed (SigV4)")
        access_key, region = match.groups()
        principal = self._config.principals.get(access_key)
        if principal is None:
            raise KmsError(
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        return _Call(action, body, principal, _moto_account(access_key), region)

    # (2) attestation and (3) the key policy ----------------------------------------------------

    def _authorize(self, call: _Call) -> bytes | None:
        """Evaluate the key policy; return the attested RSA key (DER SPKI) if a Recipient is set."""
        attested_pcrs, spki = self._recipient(call)
        key_arns = self._key_arns(call)
        if call.action in _KEYLESS_ACTIONS and not key_arns:
            return spki
        context = request_context(
            call.principal,
            encryption_context=_encryption_context(call.body),
            attestation_pcrs=attested_pcrs,
        )
        for key_arn in key_arns:
            decision = evaluate(
                _key_policy(key_arn),
                KmsRequest(
                    principal=call.principal,
                    action=f"kms:{call.action}",
                    resource=key_arn,
                    context=context,
                ),
            )
            log.info(
                "kms:%s by %s on %s: %s", call.action, call.principal, key_arn, decision.reason
            )
            if not decision.allowed:
                raise KmsError(
                    "AccessDeniedException",
                    f"User: {call.principal} is not authorized to perform: kms:{call.action} "
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

    def _key_arns(self, call: _Call) -> list[str]:
        backend = _backend(call.account, call.region)
        ids: list[str] = []
        for name in ("KeyId", "TargetKeyId", "DestinationKeyId"):
            value = call.body.get(name)
            if isinstance(value, str) and value:
                ids.append(value)
        if call.action in {"Decrypt", "ReEncrypt"} and "KeyId" not in call.body:
            ids.append(_key_id_from_blob(call.body.get("CiphertextBlob")))
        arns: list[str] = []
        for key_id in ids:
            try:
                arns.append(backend.describe_key(backend.any_id_to_key_id(key_id)).arn)
            except Exception:  # noqa: BLE001 (moto raises its own NotFound types; KMS answers so)
                raise KmsError("NotFoundException", f"Key '{key_id}' does not exist") from None
        return arns

    # (4) the answer for a Recipient ------------------------------------------------------------

    @staticmethod
    def _for_recipient(answer: dict[str, Any], spki: bytes) -> dict[str, Any]:
        plaintext = base64.b64decode(answer.pop("Plaintext"))
        envelope = envelope_for_recipient(plaintext, spki)
        answer["CiphertextForRecipient"] = base64.b64encode(envelope).decode("ascii")
        return answer

    def _forward(
        self, environ: dict[str, Any], start_response: Callable[..., Any], body: dict[str, Any]
    ) -> Iterable[bytes]:
        _replace_body(environ, body)
        return self._app(environ, start_response)

    def _call_moto(
        self, environ: dict[str, Any], body: dict[str, Any]
    ) -> tuple[str, list[tuple[str, str]], bytes]:
        _replace_body(environ, body)
        captured: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            captured["status"], captured["headers"] = status, headers
            return lambda data: None

        payload = b"".join(self._app(environ, capture))
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
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        class QuietHandler(MotoRequestHandler):
            """Access lines go to our logger at DEBUG, not to stderr at INFO."""

            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                log.debug("%s %s", self.requestline, code)

        app = KmsGateway(DomainDispatcherApplication(create_backend_app), self._config)
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
    return KeyPolicy.from_json(text)


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


def _replace_body(environ: dict[str, Any], body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    environ["wsgi.input"] = io.BytesIO(data)
    environ["CONTENT_LENGTH"] = str(len(data))


def _json(start_response: Callable[..., Any], status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status,
        [("Content-Type", "application/x-amz-json-1.1"), ("Content-Length", str(len(data)))],
    )
    return [data]


def _error(start_response: Callable[..., Any], error: KmsError) -> list[bytes]:
    return _json(start_response, "400 Bad Request", {"__type": error.code, "message": str(error)})


def principals_from(pairs: Sequence[str]) -> dict[str, str]:
    """Parse ``AKID=ARN`` pairs (``nci kms serve --principal``)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, arn = pair.partition("=")
        if not sep:
            raise ConfigError(f"--principal {pair!r}: expected ACCESS_KEY_ID=ARN")
        out[key.strip()] = arn.strip()
    return out
