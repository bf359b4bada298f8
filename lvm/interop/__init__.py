"""Checkpoint interoperability: LWM's released JAX checkpoints in (`lwm`), Hugging Face Llama out (`hf`).

Modules: `tux_stream` (LWM's streaming msgpack params files), `safe_pickle` (the VQGAN pickle, restricted),
`orbax_writer` (this project's params checkpoint written one block at a time), `lwm` (name and layout mapping,
`lvm convert-lwm`), `hf` (`lvm export-hf`).
"""
