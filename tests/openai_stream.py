"""Reading a streamed chat completion from the ``openai`` client (the serve tests' one reader)."""


def collect(chunks) -> tuple:
    """``(text, usage, finish_reason)`` of a stream of chat completion chunks."""
    text, usage, finish = "", None, None
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    return text, usage, finish
