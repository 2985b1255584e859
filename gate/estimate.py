"""How big a request is, read from the request itself, before the engine sees it.

The gate must charge a request against the in-flight token budget when it
admits it, and it has no tokenizer (a tokenizer per model would make the
sidecar model-specific and slow to start). So:

Prompt tokens, first rule that applies:
1. the `x-prompt-tokens` header (a client or router that tokenized already);
2. a prompt given as token ids (`prompt: [1, 2, 3]` or a batch of such
   lists): the exact count;
3. otherwise characters / 4 of the prompt text (`prompt` string or list of
   strings; `messages[].content`, string or text parts), rounded up, at least
   1. Four characters per token is the usual figure for English with
   Llama/GPT BPE vocabularies; code and non-Latin scripts run denser, so the
   budget is an estimate, not a guarantee.

Max output tokens: `max_completion_tokens`, else `max_tokens`, else the
gate's `default_max_tokens` setting; multiplied by `n` (completions per
prompt) when given, since every choice occupies the KV cache.

Priority (for the `priority` discipline): the `x-priority` header, an
integer, default 0; higher goes first.

SLO class (`classify`), first rule that applies:
1. the `x-batchpilot-class` header: a class the gate serves is that class;
   any other value is served in the default class and the reason counted
   (`unknown_class`: a well-formed name the gate does not serve;
   `malformed_class`: not a class name at all), never refused: a client
   cannot know which classes a replica serves at this moment, and a label
   value per header sent would let any client grow the metrics without end;
2. the first class whose `match.header` the request carries with one of
   `match.values` (a tenant or API-key header an authenticating gateway sets);
3. the first class whose `match.models` lists the body's `model`;
4. the default class.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchpilot.contract.errors import FieldError
from batchpilot.contract.gate_metrics import ClassDefaultReason
from batchpilot.contract.knobs import CLASS_HEADER, CLASS_NAME, DEFAULT_CLASS, Knobs

CHARS_PER_TOKEN = 4
PROMPT_TOKENS_HEADER = "x-prompt-tokens"
PRIORITY_HEADER = "x-priority"


class RequestError(FieldError):
    """The request cannot be sized; `field` names the offending body field or header."""


@dataclass(frozen=True, slots=True)
class RequestSize:
    prompt_tokens: int
    max_output_tokens: int
    priority: int
    stream: bool


def estimate_request(
    body: bytes, headers: Mapping[str, str], default_max_tokens: int
) -> RequestSize:
    """Size a completions / chat-completions request body (JSON bytes)."""
    return estimate_payload(parse_body(body), headers, default_max_tokens)


def parse_body(body: bytes) -> Any:
    """The request body's JSON value; `RequestError` when it is not JSON."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError("body", f"request body is not valid JSON ({err})") from err


def estimate_payload(
    payload: Any, headers: Mapping[str, str], default_max_tokens: int
) -> RequestSize:
    """Size an already-parsed request body."""
    if not isinstance(payload, dict):
        raise RequestError("body", "request body must be a JSON object")
    return RequestSize(
        prompt_tokens=_prompt_tokens(payload, headers),
        max_output_tokens=_max_output_tokens(payload, default_max_tokens),
        priority=_header_int(headers, PRIORITY_HEADER, default=0, minimum=None),
        stream=payload.get("stream") is True,
    )


def classify(
    payload: Any, headers: Mapping[str, str], knobs: Knobs
) -> tuple[str, ClassDefaultReason | None]:
    """The SLO class a request is served in (module docstring), and why it was
    defaulted when its class header named no class the gate serves.

    Never raises: whatever a client sends, the request is served in some class.
    """
    named = headers.get(CLASS_HEADER)
    if named is not None:
        name = named.strip()
        if name in knobs.class_names:
            return name, None
        if CLASS_NAME.fullmatch(name):
            return DEFAULT_CLASS, ClassDefaultReason.UNKNOWN_CLASS
        return DEFAULT_CLASS, ClassDefaultReason.MALFORMED_CLASS
    classes = knobs.classes
    if not classes:
        return DEFAULT_CLASS, None
    for service_class in classes:
        match = service_class.match
        if match.header is not None and headers.get(match.header) in match.values:
            return service_class.name, None
    model = payload.get("model") if isinstance(payload, dict) else None
    if isinstance(model, str):
        for service_class in classes:
            if model in service_class.match.models:
                return service_class.name, None
    return DEFAULT_CLASS, None


def _prompt_tokens(payload: dict[str, Any], headers: Mapping[str, str]) -> int:
    if PROMPT_TOKENS_HEADER in headers:
        return _header_int(headers, PROMPT_TOKENS_HEADER, default=0, minimum=0)
    if "prompt" in payload:
        prompt = payload["prompt"]
        token_count = _token_id_count(prompt)
        if token_count is not None:
            return token_count
        return _chars_to_tokens(_prompt_chars(prompt))
    if "messages" in payload:
        return _chars_to_tokens(_messages_chars(payload["messages"]))
    raise RequestError("prompt", "request has neither `prompt` nor `messages`")


def _token_id_count(prompt: Any) -> int | None:
    """Exact count for token-id prompts (`[1, 2]` or `[[1, 2], [3]]`), else None."""
    if not isinstance(prompt, list) or not prompt:
        return None
    if all(isinstance(item, int) for item in prompt):
        return len(prompt)
    if all(isinstance(item, list) and all(isinstance(t, int) for t in item) for item in prompt):
        return sum(len(item) for item in prompt)
    return None


def _prompt_chars(prompt: Any) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list) and all(isinstance(item, str) for item in prompt):
        return sum(len(item) for item in prompt)
    raise RequestError(
        "prompt", "expected a string, a list of strings, or token ids (a list of integers)"
    )


def _messages_chars(messages: Any) -> int:
    if not isinstance(messages, list):
        raise RequestError("messages", "expected a list of message objects")
    total = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{index}]", "expected an object with role and content")
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            # Multi-part content: only text parts are counted; images are
            # sized by the engine's vision encoder, not by characters.
            total += sum(
                len(part["text"])
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return total


def _chars_to_tokens(chars: int) -> int:
    return max(1, -(-chars // CHARS_PER_TOKEN))


def _max_output_tokens(payload: dict[str, Any], default: int) -> int:
    limit = default
    for key in ("max_completion_tokens", "max_tokens"):
        value = payload.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(key, f"must be a positive integer, got {value!r}")
        limit = value
        break
    choices = payload.get("n")
    if choices is not None:
        if isinstance(choices, bool) or not isinstance(choices, int) or choices < 1:
            raise RequestError("n", f"must be a positive integer, got {choices!r}")
        limit *= choices
    return limit


def _header_int(headers: Mapping[str, str], name: str, default: int, minimum: int | None) -> int:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = int(raw.strip())
    except ValueError as err:
        raise RequestError(name, f"header must be an integer, got {raw!r}") from err
    if minimum is not None and value < minimum:
        raise RequestError(name, f"header must be at least {minimum}, got {value}")
    return value
