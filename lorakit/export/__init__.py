"""Exporting merged models and adapters: Hugging Face directories, GGUF, Ollama Modelfiles."""

from .gguf import write_gguf, write_gguf_lora
from .ollama import write_modelfile

__all__ = ["write_gguf", "write_gguf_lora", "write_modelfile"]
