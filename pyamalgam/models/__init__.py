"""Networks in the block protocol: the protocol itself, reference VGG encoder-decoders, heads."""
from .heads import DepthHead, NormalHead, SegmentationHead
from .protocol import BlockNet, BlockNetwork, Side, block_shapes, check_input, count_parameters
from .vgg import DecoderBlock, EncoderBlock, VGGEncoderDecoder, segnet_vgg, unet_vgg

__all__ = [
    "BlockNetwork",
    "BlockNet",
    "Side",
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
    "NormalHead",
]
