"""Runs on the untrusted parent: HTTP bridge, KMS relay, bundle streamer, credentials forwarder,
enclave launcher. Moves ciphertext only.

- :func:`create_app` / :func:`start_bridge` (:class:`BridgeLimits`): the consumer-facing HTTP API.
- :class:`EnclaveLink` (:class:`EnclaveError`): the control connection to the enclave.
- :class:`KmsRelay`: the blind TCP relay from the enclave to KMS.
- :class:`BundleStreamer` with :class:`FolderSource` / :class:`S3Source`
  (:class:`BundleSource`): sealed bundles to the enclave.
- :class:`CredentialsForwarder`: the parent role's credentials to the enclave.
- :class:`LocalLauncher` / :class:`NitroLauncher`: start, watch and stop the enclave.
- :func:`load_config` (:class:`ParentConfig`): ``nci parent run``'s YAML.
"""

from parent.bridge import BridgeLimits, create_app, start_bridge
from parent.bundlesource import BundleSource, FolderSource, S3Source
from parent.config import ParentConfig, load_config
from parent.credentials import CredentialsForwarder
from parent.enclave_link import EnclaveError, EnclaveLink
from parent.kms_relay import KmsRelay
from parent.launcher import LocalLauncher, NitroLauncher
from parent.streamer import BundleStreamer

__all__ = [
    "BridgeLimits",
    "BundleSource",
    "BundleStreamer",
    "CredentialsForwarder",
    "EnclaveError",
    "EnclaveLink",
    "FolderSource",
    "KmsRelay",
    "LocalLauncher",
    "NitroLauncher",
    "ParentConfig",
    "S3Source",
    "create_app",
    "load_config",
    "start_bridge",
]
