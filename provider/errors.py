"""Errors raised by the provider package.

One base class, split by who is at fault::

    ProviderError
    ├── InvalidModel   the model to seal is unfit: bad or truncated safetensors, pickle weights,
    │                  symlinks out of the folder, missing or unreadable files
    ├── KmsError       GenerateDataKey failed or timed out (the client's config bounds the wait),
    │                  or KMS answered something that is not an AES-256 data key
    ├── PublishError   the upload to S3 failed, or the bundle to publish is incomplete
    └── ConfigError    our own configuration: a bad chunk size, model id, context, S3 URL, or an
                       output folder that already exists

A manifest that breaks the format surfaces as :class:`protocol.errors.MalformedBundle`. Messages
name the file, the field and the rule; they never carry weights or key material.
"""

from __future__ import annotations

__all__ = ["ConfigError", "InvalidModel", "KmsError", "ProviderError", "PublishError"]


class ProviderError(Exception):
    """Base class of every error this package raises."""


class InvalidModel(ProviderError):
    """The model is not sealable: bad safetensors, pickle weights, escaping symlinks, I/O errors."""


class KmsError(ProviderError):
    """GenerateDataKey failed, timed out, or answered with something other than an AES-256 key."""


class PublishError(ProviderError):
    """Uploading the bundle to S3 failed, or the local bundle is incomplete."""


class ConfigError(ProviderError):
    """Our own configuration is wrong: chunk size, model id, context, URL, output folder."""
