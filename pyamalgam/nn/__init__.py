"""Modules that own the parameters of pyamalgam's operators."""
from .channel_coding import ChannelCoding
from .connector import Connector

__all__ = ["ChannelCoding", "Connector"]
