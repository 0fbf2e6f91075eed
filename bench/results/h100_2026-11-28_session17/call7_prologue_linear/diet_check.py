"""The streaming linear with and without the prologue patch: timing and outputs.

One process per kernel variant (``GPTOSS_3090_KERNEL_DIR``); session 17, call 7.
"""

import sys

import torch

sys.path.insert(0, "bench")
from bench_nf4_linear import nf4_copies, time_graph  # noqa: E402
from gptoss_3090 import ops  # noqa: E402

tag = sys.argv[1]
torch.manual_seed(0)
l2 = torch.cuda.get_device_properties(0).L2_cache_size
out = {}
for name, segs in (("qkv", [4096, 512, 512]), ("o", [2880])):
    k = 2880 if name == "qkv" else 4096
    parts = [
        ops.nf4_quantize(torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02)
        for n in segs
    ]
    copies = [nf4_copies(p, l2) for p in parts]
    ncop = min(len(c) for c in copies)
    for m in (1, 4, 16):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        out[f"{name}_m{m}"] = ops.nf4_linear(x, parts, path="stream").cpu()

        def call(i, x=x, copies=copies, ncop=ncop):
            return ops.nf4_linear(x, [c[i % ncop] for c in copies], path="stream")

        t = time_graph(call, 40, 9)
        print(f"{tag:6} {name:4} M={m:2d}: {t * 1e6:6.2f} us", flush=True)
torch.save(out, f"/root/kern/out_{tag}.pt")
