"""TEST FIXTURE: a local OpenAI-compatible chat-completions server. Not a judge.

It lets tests (and users trying `judge.backend=openai` without an account) exercise the real
HTTP path of the judge and of the `openai` sampling backend: a `ThreadingHTTPServer` on 127.0.0.1
answering `POST /v1/chat/completions` and `GET /v1/models`. Replies come from a pluggable callable
(request body -> verdict dict or raw text, or a list of texts: one choice each, for sampling
requests, cut at `max_tokens` words with finish_reason "length"; `honour_n=False` plays a server
that ignores `n` and answers one choice); every request is recorded so tests can count them and
inspect them (with their arrival time); faults can be injected (429 with Retry-After, 500, 400 as
for a prompt over the model's context, 401 quoting the request's Authorization header, a hung request, a reply trickled out a few bytes every
`trickle_s` (each read is quick, the whole is slow), malformed JSON, a schema-violating verdict, a
reply ignoring `response_format`);
`delay_s` answers every request after a fixed delay (the throughput benchmark's latency L).

    python -m alignkit.testing.chat_server --port 8011   # serves the placeholder heuristic judge
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from alignkit.judge.reference import answers_match
from alignkit.objects import find_mentions, is_present

Reply = Callable[[dict[str, Any]], "dict[str, Any] | str | list[str]"]
# Malformed HTTP 200 replies that real gateways send: the envelope, not the verdict, is broken.
ENVELOPE_FAULTS = ("html_body", "null_body", "truncated_body", "null_usage", "null_message", "content_parts")
FAULTS = ("rate_limit", "server_error", "bad_request", "unauthorized_echo", "hang", "trickle", "malformed",
          "schema_violation", "plain_text", *ENVELOPE_FAULTS)  # fmt: skip


@dataclass
class RecordedRequest:
    """One request as the server received it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    at: float = field(default_factory=time.monotonic)  # arrival time (time.monotonic)

    def text(self) -> str:
        """All text parts of the chat messages, joined."""
        parts = []
        for m in (self.body or {}).get("messages", []):
            content = m.get("content")
            if isinstance(content, str):
                parts.append(content)
            else:
                parts += [c.get("text", "") for c in content or [] if c.get("type") == "text"]
        return "\n".join(parts)

    def image_urls(self) -> list[str]:
        """The image URLs of the chat messages, in order."""
        return [
            c["image_url"]["url"]
            for m in (self.body or {}).get("messages", [])
            if isinstance(m.get("content"), list)
            for c in m["content"]
            if c.get("type") == "image_url"
        ]


@dataclass
class _FaultRule:
    when: str | None  # a substring of the request's text, or None for any request
    faults: list[str] = field(default_factory=list)


class ChatServer:
    """The fixture server; use as a context manager. `url` is the base URL for an OpenAI client."""

    def __init__(
        self,
        reply: Reply | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model: str = "alignkit-test-judge",
        retry_after: float = 0.05,
        hang_s: float = 2.0,
        trickle_s: float = 0.2,
        delay_s: float = 0.0,
        honour_n: bool = True,
    ):
        self.reply = reply or heuristic_reply
        self.model, self.retry_after, self.hang_s, self.delay_s = model, retry_after, hang_s, delay_s
        self.trickle_s = trickle_s
        self.honour_n = honour_n
        self.requests: list[RecordedRequest] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._rules: list[_FaultRule] = []
        self._lock = threading.Lock()
        self._httpd = _Server((host, port), _Handler)
        self._httpd.fixture = self  # type: ignore[attr-defined]

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def inject(self, *faults: str, when: str | None = None) -> None:
        """Answer the next matching chat requests with `faults`, one per request, in order.

        `when` restricts the rule to requests whose text contains it (deterministic per sample
        whatever the concurrency); later requests get the normal reply.
        """
        for f in faults:
            if f not in FAULTS:
                raise ValueError(f"unknown fault {f!r}: expected one of {FAULTS}")
        with self._lock:
            self._rules.append(_FaultRule(when, list(faults)))

    def serve_forever(self) -> None:
        self._httpd.serve_forever(poll_interval=0.05)  # a short poll keeps stop() quick

    def start(self) -> ChatServer:
        """Serve in a background thread."""
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- used by the handler

    def _record(self, req: RecordedRequest) -> str | None:
        """Record a request and pick its fault, if any."""
        with self._lock:
            self.requests.append(req)
            if not req.path.endswith("/chat/completions"):
                return None
            text = req.text()
            for rule in self._rules:
                if rule.faults and (rule.when is None or rule.when in text):
                    return rule.faults.pop(0)
        return None

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a hung handler must not hold up stop()
    request_queue_size = 256  # socketserver's default backlog of 5 refuses connections under concurrency


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read `requests` instead
        pass

    def do_GET(self) -> None:
        fx: ChatServer = self.server.fixture  # type: ignore[attr-defined]
        fx._record(RecordedRequest("GET", self.path, _lower(self.headers), None))
        if self.path.rstrip("/").endswith("/models"):
            model = {"id": fx.model, "object": "model", "created": 0, "owned_by": "alignkit-test"}
            self._json(200, {"object": "list", "data": [model]})
        else:
            self._json(404, _error("not found", "invalid_request_error"))

    def do_POST(self) -> None:
        fx: ChatServer = self.server.fixture  # type: ignore[attr-defined]
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            fx._record(RecordedRequest("POST", self.path, _lower(self.headers), None))
            self._json(400, _error("request body is not JSON", "invalid_request_error"))
            return
        fault = fx._record(RecordedRequest("POST", self.path, _lower(self.headers), body))
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._json(404, _error("not found", "invalid_request_error"))
            return
        fx._enter()
        self.trickle = fx.trickle_s if fault == "trickle" else 0.0
        self.envelope = fault if fault in ENVELOPE_FAULTS else None
        try:
            self._chat(fx, body, fault)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a hung request past its timeout)
        finally:
            fx._leave()

    def _chat(self, fx: ChatServer, body: dict[str, Any], fault: str | None) -> None:
        if fault == "rate_limit":
            headers = {"Retry-After": f"{fx.retry_after:g}"}
            self._json(429, _error("rate limited (injected)", "rate_limit_error"), headers)
            return
        if fault == "server_error":
            self._json(500, _error("internal error (injected)", "server_error"))
            return
        if fault == "bad_request":  # as vLLM answers a prompt longer than the model's context
            message = "This model's maximum context length is 512 tokens; the prompt has 900 (injected)"
            self._json(400, _error(message, "invalid_request_error"))
            return
        if fault == "unauthorized_echo":  # as some proxies answer a bad key: quoting the request's header
            message = f"invalid API key in header Authorization: {self.headers.get('Authorization')} (injected)"
            self._json(401, _error(message, "authentication_error"))
            return
        if fault == "hang":
            time.sleep(fx.hang_s)
        if fx.delay_s:
            time.sleep(fx.delay_s)
        out = fx.reply(body)
        schema = _schema(body)
        if isinstance(out, list):
            choices = [_cut(text, body.get("max_tokens")) for text in out[: None if fx.honour_n else 1]]
            self._completion(fx, body, choices)
            return
        if fault == "malformed":
            content = '{"rationale": "the reply was cut off, "score": '
        elif fault == "schema_violation":
            content = json.dumps(_violate(out if isinstance(out, dict) else {}, schema))
        elif fault == "plain_text":
            verdict = json.dumps(out) if isinstance(out, dict) else out
            content = f"Sure! Here is my verdict:\n```json\n{verdict}\n```\nHope this helps."
        else:
            content = json.dumps(out) if isinstance(out, dict) else out
        self._completion(fx, body, [_cut(content, body.get("max_tokens"))])  # a verdict longer than max_tokens is cut

    def _completion(self, fx: ChatServer, body: dict[str, Any], choices: list[tuple[str, str]]) -> None:
        """Reply with one choice per (text, finish_reason); a token is a word here."""
        req = RecordedRequest("POST", self.path, {}, body)
        prompt_tokens = len(req.text().split()) + 85 * len(req.image_urls())
        completion_tokens = sum(len(text.split()) for text, _ in choices)
        self._json(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", fx.model),
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": finish,
                        "logprobs": _logprobs(text) if body.get("logprobs") else None,
                    }
                    for i, (text, finish) in enumerate(choices)
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )

    def _json(self, status: int, obj: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data, kind = _envelope(getattr(self, "envelope", None), obj)
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        step = 16 if getattr(self, "trickle", 0.0) else len(data)
        for i in range(0, len(data), step):
            if i:
                time.sleep(self.trickle)
            self.wfile.write(data[i : i + step])
            self.wfile.flush()


def _envelope(fault: str | None, obj: dict[str, Any]) -> tuple[bytes, str]:
    """The reply body (and its content type) as sent, broken as an envelope fault says."""
    if fault == "html_body":
        return b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html"
    if fault == "null_body":
        return b"null", "application/json"
    if fault == "truncated_body":
        data = json.dumps(obj).encode()
        return data[: len(data) // 2], "application/json"
    if fault == "null_usage":
        obj = obj | {"usage": {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None}}
    elif fault == "null_message":
        obj = obj | {"choices": [{**obj["choices"][0], "message": None}]}
    elif fault == "content_parts":
        message = obj["choices"][0]["message"]
        parts = [{"type": "text", "text": message["content"]}]
        obj = obj | {"choices": [{**obj["choices"][0], "message": {**message, "content": parts}}]}
    return json.dumps(obj).encode(), "application/json"


def _cut(text: str, max_tokens: int | None) -> tuple[str, str]:
    """A sampled text and its finish reason: cut at `max_tokens` words ("length"), as a server would."""
    words = text.split()
    if max_tokens is not None and len(words) > max_tokens:
        return " ".join(words[:max_tokens]), "length"
    return text, "stop"


def _logprobs(text: str) -> dict[str, Any]:
    """A choice's `logprobs` as the API shapes it, one entry per token (a word here)."""
    tokens = [{"token": w, "logprob": -1.0, "bytes": list(w.encode()), "top_logprobs": []} for w in text.split()]
    return {"content": tokens}


def _lower(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": None}}


def _schema(body: dict[str, Any]) -> dict[str, Any]:
    fmt = body.get("response_format") or {}
    return (fmt.get("json_schema") or {}).get("schema") or {}


def _violate(verdict: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """The verdict with every numeric field far out of range (or a stray field, if none)."""
    bad = dict(verdict)
    numeric = [k for k, p in (schema.get("properties") or {}).items() if p.get("type") in ("integer", "number")]
    for k in numeric:
        bad[k] = int(schema["properties"][k].get("maximum", 10)) + 90
    return bad if numeric else {**bad, "not_in_schema": True}


# ---------------------------------------------------------------------------------------------
# the placeholder judge served by default


def heuristic_reply(body: dict[str, Any]) -> dict[str, Any] | list[str]:
    """A placeholder verdict filling the requested schema, NOT a real judgement.

    A request without a schema is a sampling request: it gets `n` placeholder answers that
    differ by choice index and seed.

    It reads the built-in judge prompts' wording: hallucination from the object mentions in the
    <answer> block against the "Objects actually in the image" line, correctness from the
    reference answer; any other numeric field gets its midpoint. A `winner` field (pairwise)
    names the answer with the smaller share of unsupported mentions (<answer_a> vs <answer_b>);
    a `claims` array lists each object mention as a claim, supported when it is gold.
    """
    schema = _schema(body)
    if not schema:
        seed = body.get("seed")
        return [f"Placeholder sample {i} (seed {seed}).\nAnswer: {i}" for i in range(int(body.get("n") or 1))]
    text = RecordedRequest("POST", "", {}, body).text()
    answer = _between(text, "<answer>", "</answer>")
    final = _between(text, "<final_answer>", "</final_answer>")
    gold_line = re.search(r"Objects actually in the image: (.*)", text)
    gold = [g.strip() for g in gold_line.group(1).split(",")] if gold_line else []
    reference = re.search(r"Reference answer \(known correct\): (.*)", text)
    props = schema.get("properties") or {}
    if "winner" in props:
        a, b = (_unsupported(_between(text, f"<answer_{x}>", f"</answer_{x}>"), gold) for x in "ab")
        winner = "A" if a < b else "B" if b < a else "tie"
        return {"rationale": f"Placeholder verdict: unsupported shares A {a:.0%}, B {b:.0%}.", "winner": winner}
    if "claims" in props:
        claims = [{"claim": f"there is a {m.name}", "supported": is_present(m, gold)} for m in find_mentions(answer)]
        return {"rationale": "Placeholder verdict: one claim per object mention.", "claims": claims}
    notes, verdict = [], {}
    for name, prop in (schema.get("properties") or {}).items():
        if prop.get("type") not in ("integer", "number"):
            continue
        lo, hi = prop.get("minimum", 0), prop.get("maximum", 10)
        share = 0.5
        if "halluc" in name and gold_line:
            share = _unsupported(answer, gold)
            notes.append(f"{name}: {share:.0%} of object mentions not in the gold list")
        elif "correct" in name and reference:
            share = float(answers_match(final or answer, reference.group(1), task="open"))
            notes.append(f"{name}: final answer {'matches' if share else 'does not match'} the reference")
        value = lo + share * (hi - lo)
        verdict[name] = round(value) if prop["type"] == "integer" else value
    rationale = "Placeholder verdict from the alignkit test server (not a real judge). " + "; ".join(notes)
    return {"rationale": rationale.strip(), **verdict}


def _unsupported(answer: str, gold: list[str]) -> float:
    """The share of object mentions in `answer` that are not gold (0 when there are none)."""
    mentions = find_mentions(answer)
    return sum(not is_present(m, gold) for m in mentions) / len(mentions) if mentions else 0.0


def _between(text: str, start: str, end: str) -> str:
    """The last block between the tags (the prompt may name the tags earlier, in prose)."""
    found = re.findall(re.escape(start) + r"(.*?)" + re.escape(end), text, re.DOTALL)
    return found[-1].strip() if found else ""


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the alignkit TEST judge server (a fixture, not a real judge).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--model", default="alignkit-test-judge")
    parser.add_argument("--delay", type=float, default=0.0, help="Answer every request after this many seconds.")
    args = parser.parse_args()
    server = ChatServer(host=args.host, port=args.port, model=args.model, delay_s=args.delay)
    print(f"alignkit test judge server (placeholder verdicts) at {server.url}; model {args.model!r}")
    print(
        "try: OPENAI_API_KEY=test alignkit run recipes/quickstart.yaml "
        f"judge.backend=openai judge.base_url={server.url} judge.model={args.model}"
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
