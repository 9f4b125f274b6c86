"""HF transformers <-> lcjax weight maps (in-memory tensors or safetensors; never unpickle)."""
