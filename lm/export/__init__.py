"""Other formats, both ways where it makes sense.

  hf.py            our parameters <-> a Hugging Face LlamaForCausalLM (config, tensors),
                   or Qwen3MoeForCausalLM for a mixture of experts (hf_moe.py).
  hf_moe.py        the Qwen3-MoE parts: experts' tensors, config keys, what it refuses.
  hf_import.py     reading a HF folder: config.json as model.* keys, its safetensors.
  hf_export.py     scripts/export_hf.py: a run's checkpoint as a HF folder.
  hf_tokenizer.py  the sentencepiece model as a HF tokenizer.json that encodes alike.
  gguf_export.py   scripts/export_gguf.py: a run's checkpoint as one GGUF file.
"""
