"""Layers and depth mixers."""

from .attnres import AttnResQueries
from .denseformer import DenseFormerMixer
from .attnres_stream import SourceList, SourceStream
from .depth_stream import DepthSlots, DepthStream, read_depth, read_moda
from .hyper_connections import HyperConnection, collapse_streams, expand_streams, sinkhorn
from .layers import MLP, RMSNorm, Rotary, SwiGLU, apply_rotary
from .moda import DepthKV, DepthRead, MoDAAttention
from .mudd import MuddConnections

__all__ = ["AttnResQueries", "DenseFormerMixer", "DepthKV", "DepthRead", "DepthSlots", "DepthStream", "HyperConnection",
           "MLP", "MoDAAttention", "MuddConnections", "RMSNorm", "Rotary", "SourceList", "SourceStream", "SwiGLU",
           "apply_rotary", "collapse_streams", "expand_streams", "read_depth", "read_moda", "sinkhorn"]
