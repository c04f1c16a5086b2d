"""The by-hand baseline of bench_serve.py: what a user writes today to serve several adapters over HTTP with
transformers + PEFT: FastAPI, a PeftModel with every adapter loaded, a lock so that one request runs at a time,
`set_adapter` per request, `generate` with a TextIteratorStreamer, server-sent events in OpenAI's chunk shape
(the last chunk carries `finish_reason`, and `usage` when `stream_options.include_usage` asks for it: the
streamer's text chunks are words, not tokens, so the benchmark counts tokens from the usage).

    python bench/peft_server.py --model DIR --adapter a0=DIR [--adapter a1=DIR ...] [--port 0]
"""

import argparse
import json
import socket
import sys
import threading

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def peft_server(model_dir: str, adapters: list[str], port: int, chatml: bool = False) -> None:
    """What a user writes by hand: FastAPI, PeftModel with every adapter loaded, a lock, set_adapter, generate
    with a TextIteratorStreamer, server-sent events in OpenAI's chunk shape."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if chatml:  # the smoke run's tiny tokenizer has no chat template
        tokenizer.chat_template = CHATML
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pairs = [a.split("=", 1) for a in adapters]
    model = PeftModel.from_pretrained(model, pairs[0][1], adapter_name=pairs[0][0])
    for name, path in pairs[1:]:
        model.load_adapter(path, adapter_name=name)
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()

        def events():
            with lock:  # one request at a time
                model.set_adapter(body["model"])
                ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True,
                                                    return_tensors="pt", return_dict=True)
                streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
                n = body.get("max_tokens", 64)
                extra = {"min_new_tokens": n} if body.get("ignore_eos") else {}
                out = []  # the generated ids, for the usage chunk
                worker = threading.Thread(target=lambda: out.append(model.generate(
                    **ids, max_new_tokens=n, do_sample=False, streamer=streamer, **extra)))
                worker.start()
                for text in streamer:
                    if text:
                        chunk = {"id": "x", "object": "chat.completion.chunk", "model": body["model"],
                                 "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
                        yield f"data: {json.dumps(chunk)}\n\n"
                worker.join()
            prompt = ids["input_ids"].shape[1]
            completion = out[0].shape[1] - prompt if out else 0  # (1, prompt + new) -> new tokens
            last = {"id": "x", "object": "chat.completion.chunk", "model": body["model"],
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "length" if completion >= n else "stop"}]}
            if (body.get("stream_options") or {}).get("include_usage"):
                last["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion}
            yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}/v1", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", action="append", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--chatml", action="store_true", help="give a tokenizer without a chat template ChatML's")
    args = p.parse_args()
    peft_server(args.model, args.adapter, args.port, args.chatml)
