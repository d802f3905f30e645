"""Modules that own the parameters of pyamalgam's operators."""
from .channel_coding import ChannelCoding
from .connector import Connector
from .convlstm import ConvLSTM
from .discriminator import (Discriminator, RunningInputNorm, SelfAttention2d, discriminator_a0l4, discriminator_a2l2,
                            discriminator_a2l4)

__all__ = ["ChannelCoding", "Connector", "ConvLSTM"]
__all__ += ["Discriminator", "RunningInputNorm", "SelfAttention2d", "discriminator_a2l4", "discriminator_a0l4",
            "discriminator_a2l2"]
