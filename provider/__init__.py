"""The model provider's tools: seal weights into a bundle, publish it to S3, inspect a manifest.

::

    from provider import inspect, publish, seal
    manifest = seal(Path("my-model/"), kms_client=kms, kms_key_id=key_arn,
                    model_id="acme/vlm-7b:1", out=Path("bundle/"))
    publish(Path("bundle/"), "s3://acme-models/vlm-7b/1", s3_client=s3)
    print(inspect(Path("bundle/")))

The bundle format lives in :mod:`protocol.bundle`; the KMS key and its policy come from
``nci provider create-key`` (:mod:`kms_policy`). Errors: :mod:`provider.errors`.
"""

from provider.publish import inspect, publish
from provider.seal import seal

__all__ = ["inspect", "publish", "seal"]
