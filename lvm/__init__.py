"""LVM: long-context video-language models in JAX."""
