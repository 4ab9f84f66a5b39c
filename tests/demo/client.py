"""The demo's application: the official openai SDK, unchanged, pointed at a gateway.

usage: client.py BASE_URL API_KEY MODEL COUNT [--stream]
"""

import sys

import openai


def main():
    base_url, key, model, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    stream = "--stream" in sys.argv
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)
    for i in range(count):
        messages = [{"role": "user", "content": f"request {i}"}]
        try:
            if stream:
                raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, stream=True)
                text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
            else:
                raw = client.chat.completions.with_raw_response.create(model=model, messages=messages)
                text = raw.parse().choices[0].message.content
            h = raw.headers
            print(f"  {model} #{i}: 200 from {h.get('x-switchyard-provider')} "
                  f"({h.get('x-switchyard-provider-region')}, {h.get('x-switchyard-attempts')} tries): {text[:40]!r}")
        except openai.APIError as e:
            print(f"  {model} #{i}: error {e}")


if __name__ == "__main__":
    main()
