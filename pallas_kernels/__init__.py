"""Pallas kernels for sequence mixers, each beside its pure-jnp reference.

Public functions take `backend=None` (fastest for the platform), "pallas", "interpret",
"tpu_interpret" or "reference"; see pallas_kernels._common.
"""

from pallas_kernels.attention import attention_reference, decode_attention, flash_attention
from pallas_kernels.gla import gla, gla_chunked_reference, gla_recurrent_reference, gla_step
from pallas_kernels.pooling import (
    global_aggregate,
    local_max,
    ponet_fuse,
    ponet_pool_fuse,
    prefix_mean,
    segment_max,
)
from pallas_kernels.selective_scan import (
    selective_scan,
    selective_scan_reference,
    selective_state_update,
)

__all__ = [
    "attention_reference", "decode_attention", "flash_attention",
    "gla", "gla_chunked_reference", "gla_recurrent_reference", "gla_step",
    "global_aggregate", "local_max", "ponet_fuse", "ponet_pool_fuse", "prefix_mean",
    "segment_max",
    "selective_scan", "selective_scan_reference", "selective_state_update",
]
