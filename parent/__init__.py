"""Runs on the untrusted parent: HTTP bridge, KMS relay, bundle streamer. Moves ciphertext only.

Built so far: the sealed-bundle streamer (:class:`BundleStreamer`) and its sources
(:class:`FolderSource`, :class:`S3Source`, both :class:`BundleSource`).
"""

from parent.bundlesource import BundleSource, FolderSource, S3Source
from parent.streamer import BundleStreamer

__all__ = ["BundleSource", "BundleStreamer", "FolderSource", "S3Source"]
