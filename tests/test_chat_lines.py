"""`lorakit chat` with piped stdin writes exactly one line per line read, whatever the replies contain."""

from __future__ import annotations

import io

from lorakit.commands.chat import one_line, reply_lines


class Session:
    """Stands in for ChatSession: streams a reply with blank lines, a trailing newline and a backslash, in pieces."""

    def answer(self, text: str, write) -> str:
        reply = f"First paragraph about {text}.\n\nSecond one,\r\nwith a path C:\\new\n"
        for piece in (reply[:7], reply[7:25], reply[25:]):
            write(piece)
        return reply

    def command(self, line: str) -> tuple[str, bool]:
        if line == "/exit":
            return "", False
        return "commands:\n  /reset\n  /exit", True


def unescape(line: str) -> str:
    out, i = [], 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line):
            out.append({"n": "\n", "r": "\r", "\\": "\\"}[line[i + 1]])
            i += 2
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


def test_one_line_per_question_and_reversible():
    out = io.StringIO()
    reply_lines(Session(), ["cats\n", "\n", "dogs\n", "/help\n", "/exit\n", "never read\n"], out)
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and len(lines[:-1]) == 3  # cats, dogs, /help; the blank line and /exit give none
    assert unescape(lines[0]) == Session().answer("cats", lambda piece: None)
    assert unescape(lines[1]).startswith("First paragraph about dogs.\n\n")
    assert unescape(lines[2]) == "commands:\n  /reset\n  /exit"
    assert "\n" not in one_line("a\nb\r\nc\\n") and unescape(one_line("a\nb\r\nc\\n")) == "a\nb\r\nc\\n"


def test_piped_chat_end_to_end_pairs_lines(tmp_path, capsys, monkeypatch):
    from cli_setup import random_adapter, save_tiny_model

    from lorakit.cli import main

    adapter, _ = random_adapter(save_tiny_model(tmp_path / "model"), tmp_path / "kb")
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n\nSay some digits.\n/reset\nWhat is the VPN?\n"))
    assert main(["chat", "--adapter", str(adapter), "--temperature", "0", "--max_new_tokens", "12"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == 5 and lines[-1] == "" and lines[2] == "(conversation cleared)"
