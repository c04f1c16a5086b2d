"""`lorakit serve`: an OpenAI-compatible server over one base model and many LoRA adapters, continuously batched.

protocol (request/response shapes), api (routes, SSE, auth, errors), engine (the loop thread), scheduler (waiting
and running sequences, admission), runner (batch tensors, the forwards), kv (the KV cache, with spare
columns), sequence (one request's state),
registry (adapters loaded, loaded at run time, unloaded), metrics (Prometheus).
"""
