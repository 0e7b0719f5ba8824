"""Reference training throughput of the stack axolotl wraps (transformers + PEFT, SDPA, bf16,
fused torch AdamW) on a model shape with random weights, for scripts/gpu-bench.sh.

    python3 hf_baseline.py CONFIG.json MODE SEQ BATCH [gc]

CONFIG.json is a configs/bench/*.json model shape, MODE `lora` (r 16, alpha 32, every linear
layer, as `ferrotune bench train`) or `full`; `gc` turns on gradient checkpointing. Prints one
JSON line: tokens/s over 8 timed steps after 3 warm-ups, and peak allocated memory."""
import json, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def run(config_path, mode, seq, bs, gc, steps=8, warm=3, attn="sdpa"):
    torch.manual_seed(0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with open(config_path) as f:
        cfg = LlamaConfig(**{k: v for k, v in json.load(f).items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mode == "lora":
            model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (bs, seq), device="cuda")
    model.train()
    for i in range(warm + steps):
        if i == warm:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    res = dict(impl="transformers+peft", config=config_path, mode=mode, seq=seq, batch=bs, gc=gc, attn=attn,
               tok_s=round(bs * seq * steps / dt), step_ms=round(1000 * dt / steps, 1),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
               params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1), loss=round(out.loss.item(), 3))
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    import transformers, peft
    print(json.dumps(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                          transformers=transformers.__version__, peft=peft.__version__)), flush=True)
    a = sys.argv[1:]
    run(a[0], a[1], int(a[2]), int(a[3]), len(a) > 4 and a[4] == "gc")
