"""Checks that what ferrotune writes loads in the Python tools a user would try:
  1. our adapter in PEFT (`PeftModel.from_pretrained`) gives our logits;
  2. our merged checkpoint in transformers gives the unmerged (PEFT) logits.

DIR holds: base/ (a Hugging Face model), adapter/ (trained by `ferrotune train`),
merged/ (`ferrotune merge`), ids.txt (comma-separated token ids) and ours.safetensors
(`ferrotune score --adapter adapter --ids ... --logits-out`).

  python3 scripts/interop/peft_check.py DIR [OUT.json]
"""
import json, os, sys
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
from safetensors.torch import load_file


def main(d, out_json=None):
    ids = torch.tensor([[int(x) for x in open(os.path.join(d, "ids.txt")).read().strip().split(",")]])
    ours = load_file(os.path.join(d, "ours.safetensors"))["logits"]
    base = AutoModelForCausalLM.from_pretrained(os.path.join(d, "base"), torch_dtype=torch.float32, attn_implementation="eager")
    pm = PeftModel.from_pretrained(base, os.path.join(d, "adapter"))
    pm.eval()
    with torch.no_grad():
        peft_logits = pm(input_ids=ids).logits[0]
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(d, "merged"), torch_dtype=torch.float32, attn_implementation="eager")
    merged.eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits[0]

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    with torch.no_grad(), pm.disable_adapter():
        base_logits = pm(input_ids=ids).logits[0]
    r = {
        "adapter_loads_in_peft": True,
        "peft_vs_ours_rel_err": rel(ours, peft_logits),
        "peft_vs_ours_max_abs": (ours - peft_logits).abs().max().item(),
        "merged_vs_peft_rel_err": rel(merged_logits, peft_logits),
        "merged_vs_peft_max_abs": (merged_logits - peft_logits).abs().max().item(),
        # The adapter must matter, or the comparisons above prove nothing.
        "adapter_vs_base_rel_diff": rel(peft_logits, base_logits),
    }
    ok = (r["peft_vs_ours_rel_err"] < 1e-4 and r["merged_vs_peft_rel_err"] < 1e-4
          and r["adapter_vs_base_rel_diff"] > 1e-3)
    r["pass"] = ok
    print(json.dumps(r, indent=1))
    if out_json:
        json.dump(r, open(out_json, "w"), indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
