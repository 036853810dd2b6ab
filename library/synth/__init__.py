"""Synthetic training data from a model's predictions: prompts and conditioning images from annotated source
images, SDXL generation (optionally with a LoRA trained on the sources and ControlNet-LLLite), detector filtering,
and records in the input's own format. `tools/synthesize.py` is the command line; `pipeline.run` does the work."""
