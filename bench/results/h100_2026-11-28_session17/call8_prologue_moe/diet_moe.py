"""The MoE streaming kernels with and without the prologue patch: timing and outputs.

One process per kernel variant (``GPTOSS_3090_KERNEL_DIR``); session 17, call 8.
"""

import sys

import torch

sys.path.insert(0, "bench")
import bench_moe as B  # noqa: E402
from gptoss_3090 import moe as M  # noqa: E402

tag = sys.argv[1]
dev = torch.device("cuda", 0)
layers = []
for li in range(12):
    gu = B.random_nf4(B.E, 2 * B.I, B.H, 10 * li + 1, dev)
    dn = B.random_nf4(B.E, B.H, B.I, 10 * li + 2, dev)
    w = M.MoeLayerWeights(gu, dn, M._dynamic_map_signed().to(dev), top_k=B.TOPK)
    w.chunk_major(in_place=True)
    layers.append(w)
out = {}
for t in (1, 4, 16, 64):
    o = B.Ours(layers, t, "auto", graph=True)
    o()
    torch.cuda.synchronize()
    tw, ti = o.routes[0]
    out[f"t{t}"] = M.moe(o.x, layers[0], topk_ids=ti, topk_weights=tw).cpu()
    ms = B.time_fn(o, 20)
    print(f"{tag:6} T={t:3d}: {ms * 1e3 / len(layers):7.2f} us per layer", flush=True)
torch.save(out, f"/root/kern/moe_{tag}.pt")
