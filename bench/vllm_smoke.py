"""End-to-end smoke test on a GPU host: vLLM 0.26 + our plugin on the tiny synthetic checkpoint.

Greedy-decodes a few token-id prompts (some longer than the 128-token sliding window) through
``vllm.LLM(..., quantization="bnb_moe")`` with vLLM's defaults (torch.compile + CUDA graphs),
then teacher-forces the same sequences through transformers in fp32 on ``reference/`` and
reports how often our greedy token is also transformers' argmax, and the mean |logprob diff|.

    python bench/vllm_smoke.py --ckpt /tmp/tiny --out results.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ckpt", required=True, help="tiny synthetic checkpoint (gptoss-3090 synth)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no compile, no graphs)")
    args = ap.parse_args()

    import torch
    from vllm import LLM, SamplingParams, TokensPrompt

    ckpt = Path(args.ckpt)
    g = torch.Generator().manual_seed(0)
    lengths = [3, 17, 64, 127, 129, 200, 333, 40]
    prompts = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in lengths]

    t0 = time.time()
    llm = LLM(
        model=str(ckpt),
        quantization="bnb_moe",
        max_model_len=1024,
        gpu_memory_utilization=0.3,
        enforce_eager=args.eager,
        skip_tokenizer_init=True,
        seed=0,
        max_num_seqs=16,
    )
    load_s = time.time() - t0
    sp = SamplingParams(
        temperature=0.0, max_tokens=args.max_tokens, logprobs=1, ignore_eos=True, detokenize=False
    )
    t0 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    gen_s = time.time() - t0
    ours = [list(o.outputs[0].token_ids) for o in outs]
    our_lp = [
        [
            next(iter(d.values())).logprob if tok not in d else d[tok].logprob
            for tok, d in zip(toks, o.outputs[0].logprobs, strict=True)
        ]
        for toks, o in zip(ours, outs, strict=True)
    ]
    del llm
    torch.cuda.empty_cache()

    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(ckpt / "reference"), dtype=torch.float32)
    ref = ref.cuda().eval()
    agree = total = 0
    diffs: list[float] = []
    for p, toks, lps in zip(prompts, ours, our_lp, strict=True):
        seq = torch.tensor([p + toks], device="cuda")
        with torch.no_grad():
            logits = ref(seq).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        for i, tok in enumerate(toks):
            row = logp[len(p) - 1 + i]
            agree += int(int(row.argmax()) == tok)
            total += 1
            diffs.append(abs(float(row[tok]) - lps[i]))
    result = {
        "load_s": round(load_s, 1),
        "generate_s": round(gen_s, 2),
        "tokens": total,
        "greedy_agreement": agree / total,
        "mean_abs_logprob_diff": sum(diffs) / len(diffs),
        "max_abs_logprob_diff": max(diffs),
        "eager": args.eager,
        "prompt_lengths": lengths,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
