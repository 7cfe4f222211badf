"""Sequence mixers as Flax NNX modules: x [B, L, d_model] -> [B, L, d_model].

    from mixers import build_mixer
    mixer = build_mixer({"type": "gla", "n_heads": 4}, d_model=256, rngs=nnx.Rngs(0))
"""

from mixers.attention import Attention, AttentionConfig
from mixers.base import Mixer, MixerConfig
from mixers.gla import GatedLinearAttention, GLAConfig
from mixers.mamba import Mamba, MambaConfig
from mixers.pooling import PoolingConfig, PoolingMixer
from mixers.probsparse import ProbSparseAttention, ProbSparseConfig
from mixers.registry import build_mixer, mixer_config, mixer_types, register_mixer

register_mixer("attention", AttentionConfig, Attention)
register_mixer("gla", GLAConfig, GatedLinearAttention)
register_mixer("mamba", MambaConfig, Mamba)
register_mixer("pooling", PoolingConfig, PoolingMixer)
register_mixer("probsparse", ProbSparseConfig, ProbSparseAttention)

__all__ = [
    "Attention", "AttentionConfig", "GatedLinearAttention", "GLAConfig", "Mamba", "MambaConfig",
    "Mixer", "MixerConfig", "PoolingConfig", "PoolingMixer", "ProbSparseAttention",
    "ProbSparseConfig",
    "build_mixer", "mixer_config", "mixer_types", "register_mixer",
]
