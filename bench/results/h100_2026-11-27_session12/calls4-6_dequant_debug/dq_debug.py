"""Session 12's dequantize debug probe: one nf4_dequantize of SHAPE (e.g. 3x100), nested if the
second argument is 1, with random codes; prints ok or raises (run under CUDA_LAUNCH_BLOCKING=1)."""

import math
import sys

import torch
from gptoss_3090 import ops

shape = tuple(int(v) for v in sys.argv[1].split("x"))
nested = sys.argv[2] == "1"
numel = math.prod(shape)
packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, device="cuda")
nb = -(-numel // 64)
if nested:
    absmax = torch.randint(0, 256, (nb,), dtype=torch.uint8, device="cuda")
    nabs = torch.rand(-(-nb // 256), device="cuda")
    nmap = ops.dynamic_map_signed().cuda()
    out = ops.nf4_dequantize(packed, absmax, shape, torch.bfloat16, nabs, nmap, 0.05)
else:
    absmax = torch.rand(nb, device="cuda")
    out = ops.nf4_dequantize(packed, absmax, shape, torch.bfloat16)
torch.cuda.synchronize()
print("ok", shape, nested, float(out.float().abs().sum()))
