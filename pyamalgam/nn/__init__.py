"""Modules that own the parameters of pyamalgam's operators."""
from .channel_coding import ChannelCoding

__all__ = ["ChannelCoding"]
