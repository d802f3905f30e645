"""Networks in the block protocol: its two interfaces (:class:`BlockNetwork` for teachers,
:class:`BlockTrunk` for student templates), the chain-of-blocks implementation
:class:`SequentialBlockNet`, reference VGG encoder-decoders and task heads."""
import warnings

from .heads import DepthHead, EdgeHead, KeypointHead, NormalHead, SegmentationHead
from .protocol import (BlockNetwork, BlockTrunk, Side, block_shapes, check_input, count_parameters, missing_members,
                       protocol_gap)
from .sequential import SequentialBlockNet
from .smp import SMPBlockNet, from_smp
from .vgg import DecoderBlock, EncoderBlock, VGGEncoderDecoder, segnet_vgg, unet_vgg

__all__ = [
    "BlockNetwork",
    "BlockTrunk",
    "SequentialBlockNet",
    "Side",
    "missing_members",
    "protocol_gap",
    "block_shapes",
    "check_input",
    "count_parameters",
    "VGGEncoderDecoder",
    "EncoderBlock",
    "DecoderBlock",
    "segnet_vgg",
    "unet_vgg",
    "SegmentationHead",
    "DepthHead",
    "EdgeHead",
    "KeypointHead",
    "NormalHead",
    "from_smp",
    "SMPBlockNet",
]


def __getattr__(name):
    # BlockNet was SequentialBlockNet's name, one suffix away from the BlockNetwork interface.
    if name == "BlockNet":
        warnings.warn("pyamalgam.models.BlockNet is deprecated; use SequentialBlockNet", DeprecationWarning, stacklevel=2)
        return SequentialBlockNet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
