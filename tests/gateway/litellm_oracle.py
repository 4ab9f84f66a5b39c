"""An independent OpenAI -> Anthropic translator: LiteLLM, run in its own virtualenv
(`.venv-litellm`, since it pins an older openai SDK than the tests use).

Reads {"api_base": ..., "request": {...}} on stdin, sends the OpenAI-style request to the
Anthropic endpoint at api_base through litellm.completion, and prints what LiteLLM made
of the answer, in the same summary shape the tests build from the gateway's answer."""

import json
import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402


def summarise_message(message, finish, usage):
    calls = [
        {"id": c.id, "name": c.function.name, "arguments": json.loads(c.function.arguments or "{}")}
        for c in (message.tool_calls or [])
    ]
    return {
        "content": message.content or "",
        "finish_reason": finish,
        "tool_calls": [{"name": c["name"], "arguments": c["arguments"]} for c in calls],
        "usage": None if usage is None else {"prompt_tokens": usage.prompt_tokens,
                                              "completion_tokens": usage.completion_tokens},
    }


def main():
    spec = json.load(sys.stdin)
    request = dict(spec["request"])
    model = "anthropic/" + request.pop("model")
    response = litellm.completion(model=model, api_base=spec["api_base"], api_key="oracle-key", **request)
    if not request.get("stream"):
        choice = response.choices[0]
        out = summarise_message(choice.message, choice.finish_reason, response.usage)
    else:
        chunks = list(response)
        rebuilt = litellm.stream_chunk_builder(chunks, messages=request["messages"])
        choice = rebuilt.choices[0]
        out = summarise_message(choice.message, choice.finish_reason, rebuilt.usage)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
