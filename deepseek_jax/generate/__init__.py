"""Generation: the latent KV cache, sampling, and the prefill + on-device decode loop."""
