"""Talk to ``moe-mpi serve`` with the ``openai`` package.

Start a server first (``make serve``, or ``mpirun -n 2 moe-mpi serve --model M``),
then::

    python examples/openai_client.py [--url http://127.0.0.1:8080/v1] [--api-key KEY] "Your question"

It lists the served model, asks one question and streams the answer, then
prints the usage the server counted.
"""

import argparse
import os
import sys

from openai import OpenAI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("question", nargs="?", default="What is a mixture of experts?")
    parser.add_argument("--url", default="http://127.0.0.1:8080/v1", help="The server's /v1 base URL.")
    parser.add_argument("--api-key", default=os.environ.get("MOE_MPI_API_KEY", "none"), help="The server's --api-key, if it has one.")
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args(argv)

    client = OpenAI(base_url=args.url, api_key=args.api_key)
    model = client.models.list().data[0].id  # the one model the cluster serves
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.question}],
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            sys.stdout.write(chunk.choices[0].delta.content)
            sys.stdout.flush()
        usage = chunk.usage or usage
    print()
    if usage is not None:
        print(f"[{model}: {usage.prompt_tokens} prompt tokens, {usage.completion_tokens} generated]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
