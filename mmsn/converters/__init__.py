"""Checkpoint converters: released ImageNet models to mmdet/mmseg backbones."""
from .resnet import ConversionError, convert_checkpoint, convert_resnet, load_source

__all__ = ['ConversionError', 'convert_checkpoint', 'convert_resnet', 'load_source']
