"""Wire formats: JSON tensors, safetensors bodies and state-dict trees. No HTTP, no sessions."""
