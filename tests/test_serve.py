"""`lorakit serve` end to end: a real uvicorn server on 127.0.0.1 (ephemeral port), the real `openai` SDK as the
client, a tiny Llama with random adapters saved to disk. Greedy answers are compared with `lorakit chat
--temperature 0 --prompt` and with `generate`, alone and sharing the batch with other adapters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from cli_setup import random_adapter, save_tiny_model
from serve_setup import serving
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.adapters import load_adapters, parse_adapter_specs, use_adapter
from lorakit.chat import stop_token_ids
from lorakit.cli import main
from lorakit.generation import Sampling, generate

QUESTIONS = ["What is the VPN address?", "Who can help you today?", "Say some digits.", "Hello there"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = save_tiny_model(root / "model")
    adapters = {name: random_adapter(model, root / name, seed=i, scale=0.4)[0] for i, name in enumerate("ab")}
    random_adapter(model, root / "rs", seed=5, scale=0.4, use_rslora=True)
    adapters["dora"] = random_adapter(model, root / "dora", seed=6, scale=0.4, use_dora=True)[0]
    save_tiny_model(root / "other", hidden_size=32, intermediate_size=48)  # another shape: its adapters do not fit
    random_adapter(root / "other", root / "misfit", seed=7)
    return {"root": root, "model": model, **adapters}


@pytest.fixture(scope="module")
def server(files):
    specs = f"a={files['a']},b={files['b']},dora={files['root'] / 'dora'}"
    with serving(specs) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def chat_answer(files, question: str, adapter: str | None, max_tokens: int, capsys) -> str:
    """What `lorakit chat --temperature 0 --prompt QUESTION` prints (the base: the model with no adapter)."""
    source = ["--adapter", f"{adapter}={files[adapter]}"] if adapter else ["--model", str(files["model"])]
    assert main(["chat", *source, "--temperature", "0", "--max_new_tokens", str(max_tokens), "--prompt",
                 question]) == 0
    return capsys.readouterr().out.removesuffix("\n")


def ask(client, model: str, question: str, max_tokens: int = 12, **extra):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          max_tokens=max_tokens, temperature=0, **extra)


def test_models_lists_the_base_and_every_adapter(server, client, files):
    models = {m.id: m for m in client.models.list().data}
    base = server.registry.base_id
    assert set(models) == {base, "a", "b", "dora"}
    assert models["a"].parent == base and models["a"].root == str(files["a"])
    assert models[base].parent is None


@pytest.mark.parametrize("adapter", ["a", "b", "dora", None])
def test_chat_answer_equals_lorakit_chat(server, client, files, adapter, capsys):
    model = adapter or server.registry.base_id
    reply = ask(client, model, QUESTIONS[0], max_tokens=10)
    assert reply.choices[0].message.content == chat_answer(files, QUESTIONS[0], adapter, 10, capsys)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 10
    assert reply.usage.prompt_tokens > 5 and reply.model == model


def test_adapters_change_the_answer(client, server):
    answers = {m: ask(client, m, QUESTIONS[1], max_tokens=10).choices[0].message.content
               for m in ("a", "b", server.registry.base_id)}
    assert len(set(answers.values())) == 3


def direct_completion(files, prompt: str, adapter: str | None, max_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(files["model"])
    model = AutoModelForCausalLM.from_pretrained(files["model"]).eval()
    model = load_adapters(model, parse_adapter_specs(f"a={files['a']},b={files['b']}"))
    with use_adapter(model, adapter):
        ids = generate(model, [tokenizer(prompt)["input_ids"]], Sampling(max_new_tokens=max_tokens),
                       stop_token_ids(tokenizer, model), tokenizer.pad_token_id)[0]
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_completion_per_adapter_equals_generate(client, files):
    for adapter in ("a", "b"):
        reply = client.completions.create(model=adapter, prompt=QUESTIONS[3], max_tokens=8, temperature=0)
        assert reply.choices[0].text == direct_completion(files, QUESTIONS[3], adapter, 8)


def test_stream_equals_whole_answer_with_usage(client):
    whole = ask(client, "a", QUESTIONS[2], max_tokens=14)
    chunks = list(ask(client, "a", QUESTIONS[2], max_tokens=14, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    streamed = list(client.completions.create(model="b", prompt="Hello", max_tokens=6, temperature=0, stream=True))
    alone = client.completions.create(model="b", prompt="Hello", max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == alone.choices[0].text


def test_concurrent_requests_for_different_adapters_equal_their_single_answers(client, server):
    base = server.registry.base_id
    jobs = [(m, q, n) for m in ("a", "b", "dora", base) for q, n in zip(QUESTIONS, (5, 17, 9, 13))]
    alone = [ask(client, m, q, n).choices[0].message.content for m, q, n in jobs]
    tokens, steps = server.metric("lorakit_generation_tokens_total"), server.metric("lorakit_decode_steps_total")
    with ThreadPoolExecutor(len(jobs)) as pool:  # rows join and leave the batch at different steps
        together = list(pool.map(lambda job: ask(client, *job).choices[0].message.content, jobs))
    assert together == alone
    tokens = server.metric("lorakit_generation_tokens_total") - tokens
    steps = server.metric("lorakit_decode_steps_total") - steps
    assert tokens / steps > 2  # rows of different adapters shared decode steps


def test_seeded_sampling_is_reproducible(client):
    kw = dict(messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=12, temperature=1.0, seed=3)
    one = client.chat.completions.create(model="a", **kw).choices[0].message.content
    assert client.chat.completions.create(model="a", **kw).choices[0].message.content == one


def test_stop_strings_end_the_answer_before_them(client):
    full = client.completions.create(model="a", prompt="Hello", max_tokens=16, temperature=0).choices[0]
    stop = full.text[4:6]
    cut = client.completions.create(model="a", prompt="Hello", max_tokens=16, temperature=0, stop=[stop]).choices[0]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    chunks = client.completions.create(model="a", prompt="Hello", max_tokens=16, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == cut.text


def error_of(call):
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.body


def test_errors_have_openai_shape_and_status(client, server):
    status, body = error_of(lambda: ask(client, "nope", "hi"))
    assert status == 404 and body["param"] == "model" and "nope" in body["message"]
    status, body = error_of(lambda: ask(client, "a", "hi", max_tokens=250))
    assert status == 400 and body["code"] == "context_length_exceeded" and body["param"] == "max_tokens"
    status, body = error_of(lambda: ask(client, "a", "hi", n=2))
    assert status == 400 and body["param"] == "n"
    status, body = error_of(lambda: ask(client, "a", "hi", extra_body={"frobnicate": 1}))
    assert status == 400 and body["param"] == "frobnicate" and "unknown field" in body["message"]
    status, body = error_of(lambda: ask(client, "a", "hi", logprobs=True))
    assert status == 400 and body["param"] == "logprobs"
    assert all(isinstance(v, str) or v is None for v in body.values())


def test_weighted_combination_per_request(client, server, files):
    base = server.registry.base_id

    def combo(weights: dict, model: str = base):
        return ask(client, model, QUESTIONS[0], 10, extra_body={"adapters": weights}).choices[0].message.content

    assert combo({"a": 1.0}) == ask(client, "a", QUESTIONS[0], 10).choices[0].message.content
    half = combo({"a": 0.5, "b": 0.5})
    tokenizer = AutoTokenizer.from_pretrained(files["model"])
    model = load_adapters(AutoModelForCausalLM.from_pretrained(files["model"]).eval(),
                          parse_adapter_specs(f"a={files['a']},b={files['b']}"))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    ids = generate(model, [list(prompt)], Sampling(max_new_tokens=10), stop_token_ids(tokenizer, model),
                   tokenizer.pad_token_id, adapter_names=[{"a": 0.5, "b": 0.5}])[0]
    assert half == tokenizer.decode(ids, skip_special_tokens=True)
    status, body = error_of(lambda: combo({"a": 0.5, "dora": 0.5}))
    assert status == 400 and body["param"] == "adapters" and "DoRA" in body["message"]
    assert error_of(lambda: combo({"zz": 1.0}))[0] == 404
    assert error_of(lambda: combo({"a": 1.0}, model="b"))[1]["param"] == "model"


def test_malformed_burst_then_a_correct_answer(client, server):
    url = server.base_url + "/chat/completions"
    good = {"model": "a", "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 8, "temperature": 0}
    before = ask(client, "a", QUESTIONS[0], 8).choices[0].message.content
    bad = [b"{not json", b"[1, 2]", b"", json.dumps({**good, "max_tokens": -3}).encode(),
           json.dumps({**good, "messages": []}).encode(), json.dumps({**good, "temperature": "hot"}).encode(),
           json.dumps({**good, "messages": [{"role": "robot", "content": "x"}]}).encode(),
           json.dumps({**good, "unknown_field": 1}).encode(), json.dumps({**good, "stop": [""]}).encode(),
           json.dumps({"messages": good["messages"]}).encode(), b"x" * (70 * 1024)]
    with httpx.Client(timeout=30) as http:
        statuses = [http.post(url, content=body, headers={"Content-Type": "application/json"}) for body in bad]
    assert [r.status_code for r in statuses] == [400] * 10 + [413]
    params = [r.json()["error"]["param"] for r in statuses[3:10]]
    assert params == ["max_tokens", "messages", "temperature", "messages.0.role", "unknown_field", "stop", "model"]
    assert ask(client, "a", QUESTIONS[0], 8).choices[0].message.content == before


def test_a_request_failing_in_the_engine_fails_alone(client):
    # a temperature this small overflows the scaled logits to inf: multinomial raises inside the engine
    with ThreadPoolExecutor(2) as pool:
        fine = pool.submit(ask, client, "b", QUESTIONS[1], 30, extra_body={"ignore_eos": True})
        status, body = error_of(lambda: client.chat.completions.create(
            model="a", messages=[{"role": "user", "content": "x"}], max_tokens=5, temperature=1e-40))
        assert status == 500 and "engine failed" in body["message"]
        assert fine.result().usage.completion_tokens == 30
    assert ask(client, "a", QUESTIONS[0], 4).choices[0].message.content


def test_disconnect_frees_the_row(server):
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 240, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.base_url + "/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            server.wait_for("lorakit_running_batch_size", 1)
    server.wait_for("lorakit_running_batch_size", 0, timeout=10)  # freed long before its 240 tokens


def test_runtime_load_and_unload(client, server, files):
    http = httpx.Client(base_url=server.base_url, timeout=30)
    root = files["root"]
    assert http.post("/load_lora_adapter", json={"lora_name": "rs", "lora_path": str(root / "rs")}).status_code == 200
    assert "rs" in {m.id for m in client.models.list().data}
    answers = [ask(client, m, QUESTIONS[0], 6).choices[0].message.content for m in ("rs", "a")]
    assert answers[0] != answers[1]
    taken = http.post("/load_lora_adapter", json={"lora_name": "a", "lora_path": str(root / "rs")})
    assert taken.status_code == 400 and taken.json()["error"]["param"] == "lora_name"
    misfit = http.post("/load_lora_adapter", json={"lora_name": "m", "lora_path": str(root / "misfit")})
    assert misfit.status_code == 400 and "does not fit" in misfit.json()["error"]["message"]
    missing = http.post("/load_lora_adapter", json={"lora_name": "m", "lora_path": str(root / "none")})
    assert missing.status_code == 400
    assert http.post("/unload_lora_adapter", json={"lora_name": "zz"}).status_code == 404
    # a request running on the adapter finishes after the unload; new ones get 404
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(ask, client, "rs", "hi", 120, extra_body={"ignore_eos": True})
        server.wait_for("lorakit_running_batch_size", 1)
        assert http.post("/unload_lora_adapter", json={"lora_name": "rs"}).status_code == 200
        assert error_of(lambda: ask(client, "rs", "hi"))[0] == 404
        assert running.result().usage.completion_tokens == 120
    deadline = time.monotonic() + 10
    while "rs" in server.registry.entries and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "rs" not in server.registry.model.peft_config


def test_auth_queue_full_and_runtime_switch(files):
    with serving(f"a={files['a']}", api_key="s3cret", max_batch=1, max_queue=1, runtime=False) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.base_url + "/models").status_code == 401
        assert httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        wrong = openai.OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0)
        assert error_of(lambda: ask(wrong, "a", "hi"))[0] == 401
        good = openai.OpenAI(base_url=srv.base_url, api_key="s3cret", max_retries=0, timeout=60)
        assert ask(good, "a", "hi", 3).choices[0].message.content is not None
        load = httpx.post(srv.base_url + "/load_lora_adapter", headers={"Authorization": "Bearer s3cret"},
                          json={"lora_name": "x", "lora_path": str(files["b"])})
        assert load.status_code == 404 and "--allow-runtime-adapters" in load.json()["error"]["message"]
        with ThreadPoolExecutor(2) as pool:  # one row running, one request waiting: the next is 429
            first = pool.submit(ask, good, "a", "hi", 200, extra_body={"ignore_eos": True})
            srv.wait_for("lorakit_running_batch_size", 1)
            second = pool.submit(ask, good, "a", "hi", 2)
            srv.wait_for("lorakit_queue_length", 1)
            status, body = error_of(lambda: ask(good, "a", "hi", 2))
            assert status == 429 and body["code"] == "queue_full"
            assert first.result().usage.completion_tokens == 200 and second.result().choices


def test_sigterm_stops_accepting_finishes_streams_and_exits_0(files):
    env = {**os.environ, "API_PORT": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--adapter", f"a={files['a']}",
                             "shutdown_timeout=20"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                url = line.split("listening on ")[1].strip()
            if "limits:" in line:
                break
        assert any("adapter a: r=4" in x for x in lines), lines
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        stream = ask(client, "a", "hi", 60, stream=True, extra_body={"ignore_eos": True})
        first = next(stream)
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)  # the running answer finishes
        assert first.choices[0].delta.role == "assistant" and rest[-1].choices[0].finish_reason == "length"
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url.removesuffix("/v1") + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "port must be in 0..65535"),
    (["--max-batch", "0"], "max_batch must be >= 1"),
    (["--temperature", "0"], "unknown key 'temperature'"),
])
def test_bad_settings_are_one_line_and_exit_2(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_taken_port_fails_before_loading(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 1
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and "loading" not in err
