"""Checkpoint I/O: the only code in shoal that touches weight files.

Reading (:func:`open_checkpoint`, :class:`CheckpointReader`), writing
(:class:`ShardedWriter`, :func:`staged_output`, :func:`copy_support_files`,
:func:`write_model_card`) and architecture knowledge (:func:`describe_tensor` and friends).
"""

from shoal.checkpoint.architecture import (
    ROLES,
    TensorInfo,
    describe_tensor,
    is_tied,
    layer_count_key,
    map_prefix,
    module_of,
    num_layers,
    with_layer,
)
from shoal.checkpoint.model_card import RECIPE_FILENAME, write_model_card
from shoal.checkpoint.reader import CheckpointReader, open_checkpoint
from shoal.checkpoint.safetensors_header import read_header
from shoal.checkpoint.staging import staged_output
from shoal.checkpoint.support_files import copy_support_files, update_config
from shoal.checkpoint.writer import ShardedWriter, parse_byte_size

__all__ = [
    "ROLES",
    "RECIPE_FILENAME",
    "CheckpointReader",
    "ShardedWriter",
    "TensorInfo",
    "copy_support_files",
    "describe_tensor",
    "is_tied",
    "layer_count_key",
    "map_prefix",
    "module_of",
    "num_layers",
    "open_checkpoint",
    "parse_byte_size",
    "read_header",
    "staged_output",
    "update_config",
    "with_layer",
    "write_model_card",
]
