//! NF4 launchers (dequantize, linear, quantize). Filled in by the NF4 work of issue 3.
