"""qmodel's weight-only quantized matmuls: the GPTQ v1 layout, Triton kernels, Int4Linear.

- ``layout``: pack / unpack / dequantize_ref for the checkpoint format (the one owner of it).
- ``Int4Linear`` / ``replace_linear``: the module and the module swap (linear.py).
- ``qmodel_kernels.matmul.quant_matmul``: the Triton kernels' entry point. It is not
  imported here: importing it fixes whether Triton compiles or interprets (see linear.py).
"""

from qmodel_kernels import layout
from qmodel_kernels.layout import PackedWeight
from qmodel_kernels.linear import Int4Linear, packed_layer_names, replace_linear
from qmodel_kernels.quant_weight import QuantWeight, prepare

__all__ = [
    "Int4Linear",
    "PackedWeight",
    "QuantWeight",
    "layout",
    "packed_layer_names",
    "prepare",
    "replace_linear",
]
