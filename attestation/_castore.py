"""Files of the emulator's local CA: PEM keys and certificates in one private folder.

The folder is mode 0700 and every file 0600. Changes happen under an exclusive ``flock`` on
``<folder>/.lock``, and each file is written under a temporary name, flushed and ``os.replace``-d
into place, so that concurrent processes agree on one chain and never read half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.errors import ConfigError

__all__ = ["CaStore"]

_CURVE_NAME = ec.SECP384R1.name


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as a 0600 file, atomically (temporary file + ``os.replace``)."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


class CaStore:
    """Keys and certificates as PEM files in one folder, changed only under its lock."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        # (1) the folder, private to this user; (2) an exclusive lock held for the whole update.
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
            fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot use the NSM state folder {self.directory}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def key_path(self, level: str) -> Path:
        return self.directory / f"{level}.key"

    def certificate_path(self, level: str) -> Path:
        return self.directory / f"{level}.pem"

    def load_key(self, level: str) -> ec.EllipticCurvePrivateKey | None:
        path = self.key_path(level)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path} is not a PEM private key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != _CURVE_NAME:
            raise ConfigError(f"{path} must hold an EC P-384 private key")
        return key

    def load_certificate(self, level: str) -> x509.Certificate | None:
        path = self.certificate_path(level)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            return x509.load_pem_x509_certificate(data)
        except ValueError as exc:
            raise ConfigError(f"{path} is not a PEM certificate") from exc

    def save_key(self, level: str, key: ec.EllipticCurvePrivateKey) -> None:
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_atomic(self.key_path(level), pem)

    def save_certificate(self, level: str, certificate: x509.Certificate) -> None:
        _write_atomic(
            self.certificate_path(level), certificate.public_bytes(serialization.Encoding.PEM)
        )
