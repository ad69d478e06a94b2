"""ncz.codec: the learned image codec (mean-scale hyperprior with gain units).

- networks and training: :mod:`ncz.codec.networks` (its building blocks: :mod:`ncz.codec.layers`),
  :mod:`ncz.codec.train` (:mod:`ncz.codec.growth`: more levels or a context for a trained state;
  :mod:`ncz.codec.threads`: threads per step)
- bit-exact integer hyper-synthesis: :mod:`ncz.codec.integer`
- weights files and the runtime: :func:`load_codec`, :func:`export_codec`
- files: :func:`encode` / :func:`decode` (one image), :func:`encode_images` / :func:`decode_images`
  (several, one size budget), as ``ncz encode``/``decode`` and ``Image.save`` use them
- image sections: :class:`ImageEncoder`, :func:`encode_pixels`, :func:`write_image_section`,
  :func:`decode_section`, :func:`verify_section`
- pixel files: :func:`read_image`, :func:`write_image`; rate control: :func:`choose_quality`
- encoder-side latent refinement (SGA): :class:`SGASchedule`, :func:`refine_latents`

Importing this package registers a Pillow plugin, so ``Image.open("x.ncz")`` works.
"""

from . import pillow_plugin as _pillow_plugin
from .api import decode, decode_images, encode, encode_images, image_names
from .image import ImageEncoder, decode_section, encode_pixels, verify_section, write_image_section
from .imageio import Pixels, read_image, write_image
from .networks import CodecConfig, HyperpriorCodec
from .rate import choose_quality
from .refine import RefineResult, SGAProgress, SGASchedule, refine_latents
from .weights import CodecRuntime, default_weights_path, export_codec, load_codec

_pillow_plugin.register()

__all__ = [
    "encode",
    "decode",
    "encode_images",
    "decode_images",
    "image_names",
    "ImageEncoder",
    "verify_section",
    "CodecConfig",
    "HyperpriorCodec",
    "CodecRuntime",
    "load_codec",
    "export_codec",
    "default_weights_path",
    "Pixels",
    "read_image",
    "write_image",
    "encode_pixels",
    "write_image_section",
    "decode_section",
    "choose_quality",
    "SGASchedule",
    "SGAProgress",
    "RefineResult",
    "refine_latents",
]
