"""A torch DCP ``FileSystemReader`` whose metadata load runs no code (imports torch, megatron)."""

from __future__ import annotations

from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
    CachedMetadataFileSystemReader,
)
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from inrank_megatron.checkpoint_format.safe_load import read_dcp_metadata


class SafeFileSystemReader(CachedMetadataFileSystemReader):
    """megatron's cached ``FileSystemReader`` with ``.metadata`` read by
    :class:`~inrank_megatron.checkpoint_format.safe_load.DCPMetadataUnpickler` instead of
    ``pickle.load`` (torch's ``FileSystemReader.read_metadata``)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._cached_metadata is None:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as stream:
                metadata = read_dcp_metadata(stream, str(path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._cached_metadata = metadata
        return self._cached_metadata
