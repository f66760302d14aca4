"""Working with models larger than memory: safetensors read and written a tensor at a time, and
model skeletons whose weights are read from their checkpoint only when a block's turn comes."""
from .safetensors_io import (
                             MalformedSafetensors,
                             SafetensorsFile,
                             ShardedCheckpoint,
                             TensorEntry,
                             tensor_entry,
                             write_safetensors,
)

__all__ = ["MalformedSafetensors", "SafetensorsFile", "ShardedCheckpoint", "TensorEntry", "tensor_entry",
           "write_safetensors"]
